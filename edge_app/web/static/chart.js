// lineinspect's own small SVG charts (no library, nothing fetched): axes with ticks, a threshold line.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";

function el(name, attrs, parent, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function niceTicks(lo, hi, n, integer) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function fmt(v) {
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}

// frame: margins and scales; draws both axes with tick labels and returns x(), y()
function frame(svg, xlo, xhi, ylo, yhi, xlabel, ylabel, xfmt, yint) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 900, H = 260, L = 56, R = 16, T = 12, B = 40;
  const x = v => L + (v - xlo) / ((xhi - xlo) || 1) * (W - L - R);
  const y = v => H - B - (v - ylo) / ((yhi - ylo) || 1) * (H - T - B);
  const ax = el("g", {class: "axis"}, svg);
  for (const t of niceTicks(ylo, yhi, 5, yint)) {
    el("line", {x1: L, x2: W - R, y1: y(t), y2: y(t), class: "grid"}, ax);
    el("text", {x: L - 6, y: y(t) + 4, "text-anchor": "end"}, ax, yint ? String(t) : fmt(t));
  }
  for (const t of niceTicks(xlo, xhi, 6)) {
    el("line", {x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4}, ax);
    el("text", {x: x(t), y: H - B + 16, "text-anchor": "middle"}, ax, xfmt ? xfmt(t) : fmt(t));
  }
  el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B}, ax);
  el("line", {x1: L, x2: L, y1: T, y2: H - B}, ax);
  el("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle"}, ax, xlabel);
  el("text", {x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle"}, ax, ylabel);
  return {x, y, L, R, T, B, W, H};
}

// points: [[t, score, verdict], ...]; x axis is seconds before now
function trendChart(svg, points, threshold) {
  if (!points.length) { frame(svg, -60, 0, 0, threshold * 1.5 || 1, "seconds ago", "score"); return; }
  const now = points[points.length - 1][0];
  const xs = points.map(p => p[0] - now), ys = points.map(p => p[1]);
  const ylo = Math.min(0, ...ys), yhi = Math.max(threshold * 1.2, ...ys) * 1.05;
  const f = frame(svg, Math.min(-1, xs[0]), 0, ylo, yhi, "seconds ago", "score", v => fmt(Math.abs(v)));
  points.forEach((p, i) => el("circle", {cx: f.x(xs[i]), cy: f.y(p[1]), r: 2.5, class: p[2] === "ng" ? "pt-ng" : "pt-ok"}, svg));
  el("line", {x1: f.L, x2: f.W - f.R, y1: f.y(threshold), y2: f.y(threshold), class: "thr"}, svg);
  el("text", {x: f.W - f.R - 4, y: f.y(threshold) - 4, "text-anchor": "end"}, svg, `threshold ${fmt(threshold)}`);
}

function histogramChart(svg, scores, threshold, bins) {
  bins = bins || 40;
  const lo = Math.min(threshold, ...(scores.length ? scores : [0]));
  const hi = Math.max(threshold, ...(scores.length ? scores : [1]));
  const w = ((hi - lo) || 1) / bins, counts = new Array(bins).fill(0);
  for (const s of scores) counts[Math.min(bins - 1, Math.floor((s - lo) / w))] += 1;
  const top = Math.max(1, ...counts);
  const f = frame(svg, lo, hi + w * 0.001, 0, top * 1.1, "image score", "parts", null, true);
  counts.forEach((c, i) => {
    if (!c) return;
    el("rect", {x: f.x(lo + i * w) + 0.5, y: f.y(c), width: Math.max(1, f.x(lo + w) - f.x(lo) - 1), height: f.y(0) - f.y(c), class: "bar"}, svg);
  });
  el("line", {x1: f.x(threshold), x2: f.x(threshold), y1: f.T, y2: f.H - f.B, class: "thr"}, svg);
  el("text", {x: f.x(threshold) + 4, y: f.T + 12}, svg, `threshold ${fmt(threshold)}`);
}
