"use strict";
(function () {
  const data = JSON.parse(document.getElementById("hist-data").textContent);
  histogramChart(document.getElementById("hist"), data.scores, data.threshold);
})();
