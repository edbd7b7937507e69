var st = function (err) { return {err: err, done: !!WOB_DONE_GLOBAL, reward: +WOB_REWARD_GLOBAL, raw: +WOB_RAW_REWARD_GLOBAL, reason: (WOB_REWARD_REASON === null || WOB_REWARD_REASON === undefined) ? null : String(WOB_REWARD_REASON)}; };
if (WOB_DONE_GLOBAL) return st('the episode is already over');
var res = (function () {
