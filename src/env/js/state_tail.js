
}).apply(null, arguments);
return st(res === true ? null : String(res));
