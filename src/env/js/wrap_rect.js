
var w = document.getElementById('wrap');
if (!w) return null;
var r = w.getBoundingClientRect();
return [r.left, r.top, r.width, r.height];
