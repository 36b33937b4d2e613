// The one script of the console: counts down every "time left" once a second.
// Everything works without it; the server renders the same values.
"use strict";
(function () {
  // As the server's `human`: the two largest units, a zero second one left out.
  function human(s) {
    var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, x = s % 60;
    function two(a, ua, b, ub) { return b > 0 ? a + ua + " " + b + ub : a + ua; }
    if (d > 0) return two(d, "d", h, "h");
    if (h > 0) return two(h, "h", m, "m");
    if (m > 0) return two(m, "m", x, "s");
    return x + "s";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time[data-until]").forEach(function (el) {
      var left = Math.max(0, Math.floor((Number(el.dataset.until) - now) / 1000));
      el.textContent = left > 0 ? human(left) : "ended";
    });
  }
  setInterval(tick, 1000);
})();
