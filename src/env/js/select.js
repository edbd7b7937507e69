
var r = arguments[0], want = arguments[1];
var el = core.previousDOMInfo[r];
if (el === undefined) { core.getDOMInfo(); el = core.previousDOMInfo[r]; }
if (el === undefined) return 'unknown ref ' + r;
if (!(el instanceof HTMLSelectElement)) return 'ref ' + r + ' is ' + el.tagName + ', not a SELECT';
var norm = function (s) { return String(s).replace(/\s+/g, ' ').trim(); };
var idx = -1, i;
for (i = 0; i < el.options.length && idx < 0; i++) if (norm(el.options[i].text) === norm(want)) idx = i;
for (i = 0; i < el.options.length && idx < 0; i++) if (el.options[i].value === want) idx = i;
if (idx < 0) return 'select ref ' + r + ' has no option ' + JSON.stringify(want);
el.focus();
el.selectedIndex = idx;
el.dispatchEvent(new Event('input', {bubbles: true}));
el.dispatchEvent(new Event('change', {bubbles: true}));
return true;
