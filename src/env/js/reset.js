
var seed = arguments[0], mode = arguments[1], maxTime = arguments[2];
if (typeof core === 'undefined' || typeof core.startEpisodeReal !== 'function') return 'core.js is not loaded';
if (typeof Math.seedrandom !== 'function') return 'seedrandom is missing';
core.endEpisode(0);
if (document.activeElement && document.activeElement !== document.body && document.activeElement.blur) document.activeElement.blur();
Math.seedrandom(seed);
core.setDataMode(mode);
core.EPISODE_MAX_TIME = maxTime;
core.startEpisodeReal();
if (typeof WOB_TASK_READY !== 'undefined' && !WOB_TASK_READY) return false;
