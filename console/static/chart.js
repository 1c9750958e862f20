// A small SVG line chart: EF.lineChart(series, {width, height, yLabel, xLabel, yMin, yMax}).
// series: [{name, points: [[x, y], ...]}]. Returns an <svg> element. No dependencies.
"use strict";
window.EF = window.EF || {};
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f5bd3", "#c62828", "#1a7f37", "#b26a00", "#7b1fa2", "#00838f"];
  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function ticks(lo, hi, n) {
    const out = [];
    for (let i = 0; i <= n; i++) out.push(lo + (hi - lo) * i / n);
    return out;
  }
  EF.lineChart = function (series, opts) {
    const o = Object.assign({ width: 520, height: 240, yLabel: "", xLabel: "" }, opts || {});
    const m = { l: 46, r: 12, t: 12, b: 34 };
    const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
    const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
    const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
    const y0 = o.yMin ?? Math.min(...ys, 0), y1 = o.yMax ?? Math.max(...ys, 1);
    const W = o.width - m.l - m.r, H = o.height - m.t - m.b;
    const sx = x => m.l + (x1 === x0 ? 0 : (x - x0) / (x1 - x0) * W);
    const sy = y => m.t + H - (y1 === y0 ? 0 : (y - y0) / (y1 - y0) * H);
    const svg = el("svg", { class: "chart", width: o.width, height: o.height, viewBox: `0 0 ${o.width} ${o.height}`, role: "img" });
    for (const t of ticks(y0, y1, 4)) {
      svg.appendChild(el("line", { x1: m.l, x2: m.l + W, y1: sy(t), y2: sy(t), stroke: "#eceef2" }));
      svg.appendChild(el("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end" }, t.toFixed(2)));
    }
    for (const t of ticks(x0, x1, Math.min(10, Math.max(1, x1 - x0)))) {
      svg.appendChild(el("text", { x: sx(t), y: m.t + H + 16, "text-anchor": "middle" }, String(Math.round(t))));
    }
    svg.appendChild(el("text", { x: m.l + W / 2, y: o.height - 2, "text-anchor": "middle" }, o.xLabel));
    svg.appendChild(el("text", { x: 10, y: m.t + H / 2, transform: `rotate(-90 10 ${m.t + H / 2})`, "text-anchor": "middle" }, o.yLabel));
    series.forEach((s, i) => {
      const pts = s.points.filter(p => Number.isFinite(p[1]));
      if (!pts.length) return;
      const color = COLORS[i % COLORS.length];
      svg.appendChild(el("polyline", { points: pts.map(p => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
      for (const p of pts) {
        const dot = el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color });
        dot.appendChild(el("title", {}, `${s.name}: ${p[0]} → ${p[1].toFixed(4)}`));
        svg.appendChild(dot);
      }
      svg.appendChild(el("text", { x: m.l + 8, y: m.t + 12 + 14 * i, style: `fill: ${color}` }, s.name));
    });
    return svg;
  };
  // EF.barChart(bars, opts): bars = [[label, value], ...]; values above opts.mark are red.
  EF.barChart = function (bars, opts) {
    const o = Object.assign({ width: 720, height: 200, yLabel: "", xLabel: "", mark: Infinity }, opts || {});
    const m = { l: 46, r: 12, t: 12, b: 34 };
    const W = o.width - m.l - m.r, H = o.height - m.t - m.b;
    const top = Math.max(o.yMax ?? 0, ...bars.map(b => b[1]), 1e-9);
    const svg = el("svg", { class: "chart", width: o.width, height: o.height, viewBox: `0 0 ${o.width} ${o.height}`, role: "img" });
    for (const t of ticks(0, top, 4)) {
      const y = m.t + H - t / top * H;
      svg.appendChild(el("line", { x1: m.l, x2: m.l + W, y1: y, y2: y, stroke: "#eceef2" }));
      svg.appendChild(el("text", { x: m.l - 6, y: y + 4, "text-anchor": "end" }, t.toFixed(2)));
    }
    const bw = W / Math.max(1, bars.length);
    bars.forEach((b, i) => {
      const hgt = b[1] / top * H;
      const r = el("rect", { x: m.l + i * bw + 1, y: m.t + H - hgt, width: Math.max(1, bw - 2), height: hgt,
        fill: b[1] > o.mark ? "#c62828" : "#2f5bd3" });
      r.appendChild(el("title", {}, `${b[0]}: ${b[1].toFixed(3)}`));
      svg.appendChild(r);
      if (bars.length <= 20 || i % Math.ceil(bars.length / 16) === 0) {
        svg.appendChild(el("text", { x: m.l + i * bw + bw / 2, y: m.t + H + 14, "text-anchor": "middle" }, String(b[0])));
      }
    });
    svg.appendChild(el("text", { x: m.l + W / 2, y: o.height - 2, "text-anchor": "middle" }, o.xLabel));
    svg.appendChild(el("text", { x: 10, y: m.t + H / 2, transform: `rotate(-90 10 ${m.t + H / 2})`, "text-anchor": "middle" }, o.yLabel));
    return svg;
  };
})();
