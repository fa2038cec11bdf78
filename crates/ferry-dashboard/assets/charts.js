// Ferry dashboard charts: line charts and a heatmap drawn as SVG elements. Every text
// goes in through textContent, never as markup.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";

  function el(parent, name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  function clear(svg) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
  }

  function niceTicks(min, max, count) {
    if (!(max > min)) return [min];
    const raw = (max - min) / count;
    const step = Math.pow(10, Math.floor(Math.log10(raw)));
    const unit = [1, 2, 2.5, 5, 10].map((m) => m * step).find((s) => (max - min) / s <= count) || raw;
    const ticks = [];
    for (let t = Math.ceil(min / unit) * unit; t <= max + unit * 1e-9; t += unit) ticks.push(+t.toFixed(10));
    return ticks;
  }

  function fmt(value) {
    const a = Math.abs(value);
    if (a === 0) return "0";
    if (a >= 1000) return value.toFixed(0);
    if (a >= 10) return value.toFixed(1);
    if (a >= 1) return value.toFixed(2);
    return value.toFixed(3);
  }

  // series: [{ name, points: [[x, y], ...] }]; options: { yMin, yMax, limit: { y, name } }.
  function line(svg, series, options) {
    options = options || {};
    clear(svg);
    const width = 640, height = 240, left = 52, right = 14, bottom = 40;
    const top = series.length > 1 ? 30 : 14;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const points = series.flatMap((s) => s.points);
    svg.dataset.points = String(points.length);
    if (points.length === 0) {
      el(svg, "text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, options.empty || "no rounds yet");
      return;
    }
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]).concat(options.limit ? [options.limit.y] : []);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let y0 = options.yMin !== undefined ? options.yMin : Math.min(...ys);
    let y1 = options.yMax !== undefined ? options.yMax : Math.max(...ys);
    if (y0 === y1) { y0 -= 1; y1 += 1; }
    if (options.yMin === undefined) y0 -= (y1 - y0) * 0.05;
    if (options.yMax === undefined) y1 += (y1 - y0) * 0.05;
    const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
    const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
    for (const t of niceTicks(y0, y1, 5)) {
      el(svg, "line", { class: "grid-line", x1: left, x2: width - right, y1: sy(t), y2: sy(t) });
      el(svg, "text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t));
    }
    for (const t of niceTicks(x0, x1, 8).filter((t) => Number.isInteger(t))) {
      el(svg, "text", { x: sx(t), y: height - bottom + 16, "text-anchor": "middle" }, String(t));
    }
    el(svg, "text", { x: width - right, y: height - 6, "text-anchor": "end" }, options.xLabel || "round");
    el(svg, "line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom });
    el(svg, "line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom });
    if (options.limit) {
      el(svg, "line", { class: "budget", x1: left, x2: width - right, y1: sy(options.limit.y), y2: sy(options.limit.y) });
      el(svg, "text", { x: width - right - 4, y: sy(options.limit.y) - 4, "text-anchor": "end" }, options.limit.name);
    }
    series.forEach((s, i) => {
      const cls = "s" + (i % 6);
      const sorted = s.points.slice().sort((a, b) => a[0] - b[0]);
      el(svg, "polyline", { class: "series " + cls, points: sorted.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" ") });
      if (sorted.length <= 200) {
        for (const p of sorted) {
          const dot = el(svg, "circle", { class: "point " + cls, cx: sx(p[0]), cy: sy(p[1]), r: 3 });
          el(dot, "title", {}, `${s.name}, round ${p[0]}: ${fmt(p[1])}`);
        }
      }
      if (series.length > 1) {
        const x = left + i * 150;
        el(svg, "rect", { class: cls, x: x, y: 6, width: 10, height: 10 });
        el(svg, "text", { x: x + 16, y: 15 }, s.name);
      }
    });
  }

  // values[row][col] in [0, 1] or null; rows and cols are labels. `labels` names a cell
  // (row, col, value) and says what an empty map means; by default the columns are rounds.
  const roundLabels = {
    cell: (r, c, v) => `${r}, round ${c}: ${v === null || v === undefined ? "no test examples" : fmt(v)}`,
    empty: "this run scores no classes (no central test set, or rounds not evaluated yet)",
  };
  function heatmap(svg, rows, cols, values, labels) {
    labels = labels || roundLabels;
    clear(svg);
    const left = 70, top = 26, cell = Math.max(6, Math.min(28, Math.floor(900 / Math.max(cols.length, 1))));
    const height = top + rows.length * 22 + 30, width = left + cols.length * cell + 90;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.style.height = `${height}px`;
    svg.setAttribute("preserveAspectRatio", "xMinYMin meet");
    svg.dataset.cells = String(rows.length * cols.length);
    if (rows.length === 0 || cols.length === 0) {
      svg.setAttribute("viewBox", "0 0 640 60");
      svg.style.height = "60px";
      el(svg, "text", { x: 320, y: 34, "text-anchor": "middle" }, labels.empty);
      return;
    }
    const every = Math.ceil(cols.length / 20);
    cols.forEach((c, j) => {
      if (j % every === 0) el(svg, "text", { x: left + j * cell + cell / 2, y: top - 8, "text-anchor": "middle" }, String(c));
    });
    rows.forEach((r, i) => {
      el(svg, "text", { x: left - 8, y: top + i * 22 + 15, "text-anchor": "end" }, r);
      cols.forEach((c, j) => {
        const v = values[i][j];
        const fill = v === null || v === undefined ? "#f2f4f7" : `hsl(${Math.round(8 + 132 * v)}, 62%, ${Math.round(88 - 46 * v)}%)`;
        const rect = el(svg, "rect", { x: left + j * cell, y: top + i * 22, width: cell - 1, height: 21, fill: fill });
        el(rect, "title", {}, labels.cell(r, c, v));
      });
    });
    const lx = left + cols.length * cell + 16;
    [0, 0.5, 1].forEach((v, k) => {
      el(svg, "rect", { x: lx, y: top + k * 22, width: 16, height: 16, fill: `hsl(${Math.round(8 + 132 * v)}, 62%, ${Math.round(88 - 46 * v)}%)` });
      el(svg, "text", { x: lx + 22, y: top + k * 22 + 12 }, fmt(v));
    });
  }

  window.FerryCharts = { line: line, heatmap: heatmap, fmt: fmt };
})();
