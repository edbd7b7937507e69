
var r = arguments[0];
var el = core.previousDOMInfo[r];
if (el === undefined) { core.getDOMInfo(); el = core.previousDOMInfo[r]; }
if (el === undefined) return 'unknown ref ' + r;
if (!el.isConnected) return 'ref ' + r + ' is no longer in the page';
var res = core.elementClick(r);
return res === true ? true : ('click failed: ' + String(res));
