// Draws the camera page's charts with the vendored uPlot from the JSON the server embedded in the page.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
  function width(el) { return Math.max(320, el.clientWidth || 800); }
  function draw(id, title, series, values, yLabel) {
    var el = document.getElementById(id);
    var opts = {
      title: title, width: width(el), height: 260,
      scales: { x: { time: true } },
      axes: [{}, { label: yLabel }],
      series: [{}].concat(series.map(function (name, i) {
        return { label: name, stroke: palette[i % palette.length], width: 1.5, points: { show: false } };
      }))
    };
    var chart = new uPlot(opts, [data.t].concat(values), el);
    window.addEventListener("resize", function () { chart.setSize({ width: width(el), height: 260 }); });
    el.dataset.ready = "1";
    return chart;
  }
  draw("chart-classes", "frames per " + data.interval_s + " s by class", data.classes, data.counts, "frames");
  draw("chart-bytes", "payload bytes/s", ["bytes/s"], [data.bytes_per_s], "bytes/s");
})();
