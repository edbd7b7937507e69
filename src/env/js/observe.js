
var u = core.getUtterance();
var dom = core.getDOMInfo();
var extra = {};
for (var r in core.previousDOMInfo) {
  var el = core.previousDOMInfo[r];
  if (el instanceof HTMLSelectElement) {
    var opts = [];
    for (var i = 0; i < el.options.length; i++) opts.push(el.options[i].text.replace(/\s+/g, ' ').trim());
    extra[r] = {options: opts, selected: el.selectedIndex >= 0 ? opts[el.selectedIndex] : null};
  } else if (typeof el.className !== 'string') {
    extra[r] = {cls: (el.className && typeof el.className.baseVal === 'string') ? el.className.baseVal : ''};
  }
}
return {utterance: u, dom: dom, extra: extra, done: !!WOB_DONE_GLOBAL,
        t: core.ept0 ? (new Date().getTime() - core.ept0) : 0};
