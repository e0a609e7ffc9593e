/* The live dashboard: polls /dashboard/data every POLL_MS and redraws every panel as inline SVG.
 *
 * No library: each chart is a few SVG elements made here. What a test (or a curious person)
 * can read back from the DOM:
 *   body[data-polls]          renders done so far (a render's data was fetched after the previous render)
 *   #dashboard[data-snapshot] the /events/status snapshot the numbers on the page come from (JSON)
 *   #<tile>[data-value]       each tile's raw number
 *   g.bar[data-key][data-value], rect.bar / circle.point[data-value]   one per drawn data point
 */
"use strict";
(function () {
  const POLL_MS = 3000;
  const TIMEOUT_MS = 8000;
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const pct = (a) => (a === null || a === undefined ? "–" : (100 * a).toFixed(1) + "%");
  const one = (n) => (n === null || n === undefined ? "–" : (Math.round(n * 10) / 10).toLocaleString("en-US"));
  const pad = (n) => String(n).padStart(2, "0");
  const hhmm = (ms) => { const d = new Date(ms); return pad(d.getHours()) + ":" + pad(d.getMinutes()); };
  const hhmmss = (ms) => hhmm(ms) + ":" + pad(new Date(ms).getSeconds());
  const toMs = (t) => (typeof t === "number" ? t : (t ? Date.parse(t) : NaN));

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function html(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of [].concat(children || [])) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function tooltip(node, text) { node.append(svg("title", {}, text)); return node; }

  /* The smallest 1, 2, 2.5 or 5 times a power of ten at or above v: a round top for an axis. */
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  /* A deliberate empty state: a glyph, a title and one sentence on why and what fills it. */
  function empty(container, title, text, ok) {
    clear(container);
    container.append(html("div", {class: "empty" + (ok ? " ok" : "")}, [
      html("span", {class: "glyph"}, ok ? "✓" : "…"),
      html("div", {}, [html("strong", {}, title), text])]));
  }

  // Minute charts: drawn in the svg's own pixel width (viewBox set per render), so text is never stretched.
  const CHART = {w: 900, h: 200, left: 46, right: 8, top: 10, bottom: 22};

  function sizeChart(node) {
    CHART.w = Math.max(300, Math.round(node.getBoundingClientRect().width) || 900);
    node.setAttribute("viewBox", `0 0 ${CHART.w} ${CHART.h}`);
  }

  /* The frame of a minute chart: horizontal grid lines with labels, minute labels every 10 minutes. */
  function frame(node, minutes, top, label) {
    const c = CHART, plotH = c.h - c.top - c.bottom;
    for (const f of [0, 0.5, 1]) {
      const y = c.top + plotH * (1 - f);
      node.append(svg("line", {class: "grid-line", x1: c.left, x2: c.w - c.right, y1: y, y2: y}));
      node.append(svg("text", {class: "axis-label", x: c.left - 6, y: y + 4, "text-anchor": "end"}, label(top * f)));
    }
    const slot = (c.w - c.left - c.right) / Math.max(minutes.length, 1);
    minutes.forEach((m, i) => {
      if (i % 10 === 0 || i === minutes.length - 1) {
        node.append(svg("text", {class: "axis-label", x: c.left + slot * (i + 0.5), y: c.h - 6,
                                 "text-anchor": "middle"}, hhmm(m.start_ms)));
      }
    });
    return {slot, plotH, y: (v) => c.top + plotH * (1 - v / top)};
  }

  function emptyChart(node, text) {
    node.append(svg("text", {class: "empty-text", x: CHART.w / 2, y: CHART.h / 2, "text-anchor": "middle"}, text));
  }

  /* Vertical bars, one per minute that has a value; the newest, still filling, minute is lighter. */
  function columnChart(node, minutes, key, unit, nowMs, whyEmpty) {
    clear(node);
    sizeChart(node);
    const values = minutes.map((m) => m[key]).filter((v) => v !== null && v !== undefined);
    const top = niceMax(Math.max(0, ...values));
    const f = frame(node, minutes, top, (v) => fmt(Math.round(v * 10) / 10));
    minutes.forEach((m, i) => {
      const v = m[key];
      if (v === null || v === undefined) return;
      const y = f.y(v), filling = m.start_ms + 60000 > nowMs;
      node.append(tooltip(svg("rect", {
        class: "bar" + (filling ? " partial" : ""), x: CHART.left + f.slot * i + 1, y: y,
        width: Math.max(1, f.slot - 2), height: Math.max(0, CHART.top + f.plotH - y),
        "data-start": m.start_ms, "data-value": v}),
        `${hhmm(m.start_ms)}: ${one(v)} ${unit}${filling ? " (minute still filling)" : ""}`));
    });
    if (!values.length) emptyChart(node, whyEmpty);
  }

  /* A line through the minutes that have a value (broken where a minute has none), 0 to 100 %. */
  function accuracyChart(node, minutes, whyEmpty) {
    clear(node);
    sizeChart(node);
    const f = frame(node, minutes, 1, (v) => Math.round(v * 100) + "%");
    let d = "", drawn = 0, prev = false;
    minutes.forEach((m, i) => {
      const v = m.accuracy;
      if (v === null || v === undefined) { prev = false; return; }
      const x = CHART.left + f.slot * (i + 0.5), y = f.y(v);
      d += (prev ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1);
      prev = true;
      drawn++;
    });
    if (d) node.append(svg("path", {class: "line", d: d}));
    minutes.forEach((m, i) => {
      const v = m.accuracy;
      if (v === null || v === undefined) return;
      node.append(tooltip(svg("circle", {class: "point", cx: CHART.left + f.slot * (i + 0.5), cy: f.y(v), r: 2.5,
                                          "data-start": m.start_ms, "data-value": v}),
                          `${hhmm(m.start_ms)}: ${pct(v)} of ${fmt(m.answers)} answers`));
    });
    if (!drawn) emptyChart(node, whyEmpty);
  }

  /* Horizontal bars: rows of {key, label, value, shown, max, cls, title, data}. */
  function hbarChart(container, rows) {
    clear(container);
    const rowH = 22, w = 460, nameW = 150, valueW = 70, trackW = w - nameW - valueW - 8;
    const node = svg("svg", {class: "hbar", viewBox: `0 0 ${w} ${rows.length * rowH + 2}`, role: "img"});
    rows.forEach((r, i) => {
      const y = i * rowH + 1;
      const g = svg("g", Object.assign({class: "bar", "data-key": r.key, "data-value": r.value}, r.data || {}));
      g.append(svg("text", {class: "name", x: 0, y: y + 15}, r.label));
      g.append(svg("rect", {class: "track", x: nameW, y: y + 4, width: trackW, height: 14, rx: 3}));
      const share = r.max > 0 ? Math.min(1, r.value / r.max) : 0;
      g.append(svg("rect", {class: "fill " + (r.cls || ""), x: nameW, y: y + 4,
                            width: (trackW * share).toFixed(1), height: 14, rx: 3}));
      g.append(svg("text", {class: "value", x: w, y: y + 15, "text-anchor": "end"}, r.shown));
      node.append(tooltip(g, r.title || `${r.label}: ${r.shown}`));
    });
    container.append(node);
  }

  function setTile(id, value, shown) {
    const node = $(id);
    node.dataset.value = value === null || value === undefined ? "" : String(value);
    node.textContent = shown === undefined ? fmt(value) : shown;
  }

  function newest(minutes, key) {
    for (let i = minutes.length - 1; i >= 0; i--) if (minutes[i][key] !== null && minutes[i][key] !== undefined) return minutes[i];
    return null;
  }

  function renderTiles(d, s) {
    const dead = Object.values(s.events.dead_letters).reduce((a, b) => a + b, 0);
    setTile("valid-events", s.events.valid);
    setTile("events-per-second", s.events_per_second);
    setTile("dead-letters-total", dead);
    setTile("lag-total", s.lag_total, s.lag_total === null ? "?" : fmt(s.lag_total));
    $("lag-total").title = s.lag_error || "";
    const au = d.active_users;
    setTile("active-users", au ? au.value : null, au ? fmt(au.value) : "–");
    $("active-users-window").textContent = au ? `5-minute window from ${hhmm(au.window_start_ms)}`
      : "no 5-minute window in Redis yet";
    $("watermark").textContent = s.watermark.ms ? hhmmss(s.watermark.ms) : "not yet";
    $("watermark").title = s.watermark.iso || "";
    const state = $("job-state");
    state.textContent = "job: " + s.job.state;
    state.className = "pill " + (s.job.state === "RUNNING" ? "running" : "other");
  }

  function renderCharts(d) {
    const why = d.redis.ok ? "No 1-minute windows in Redis yet: the first appears once events flow and a pane fires."
      : "Redis did not answer: " + d.redis.error;
    columnChart($("chart-eps"), d.minutes, "events_per_second", "events/s", d.generated_at_ms, why);
    accuracyChart($("chart-accuracy"), d.minutes,
                  d.redis.ok ? "No answers in the last hour yet: accuracy needs question_answered events." : why);
    const eps = newest(d.minutes, "events_per_second"), acc = newest(d.minutes, "accuracy");
    $("eps-now").textContent = eps ? `${one(eps.events_per_second)}/s at ${hhmm(eps.start_ms)}` : "";
    $("accuracy-now").textContent = acc ? `${pct(acc.accuracy)} at ${hhmm(acc.start_ms)}` : "";
  }

  function renderHardest(d) {
    if (!d.hardest_concepts.length) {
      return empty($("hardest"), "No concept ranking yet",
                   d.redis.ok ? "The hour's hardest-concepts set fills as answers arrive." : d.redis.error);
    }
    hbarChart($("hardest"), d.hardest_concepts.map((c) => ({
      key: c.concept, label: c.concept, value: c.accuracy, shown: pct(c.accuracy), max: 1,
      cls: c.accuracy < 0.5 ? "bad" : (c.accuracy < 0.7 ? "warn" : "good")})));
  }

  function renderDeadLetters(s) {
    const codes = Object.entries(s.events.dead_letters).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    if (!codes.length) return empty($("dead-letters"), "No dead letters", "Every record read so far was valid.", true);
    const max = Math.max(...codes.map((c) => c[1]));
    hbarChart($("dead-letters"), codes.map(([code, n]) => ({
      key: code, label: code, value: n, shown: fmt(n), max: max, cls: "bad"})));
  }

  function renderLag(s) {
    if (s.lag_error) return empty($("lag"), "Lag unknown", "Kafka did not answer: " + s.lag_error);
    if (!s.partitions.length) return empty($("lag"), "No partitions yet", "The job's topics have no partitions to read.");
    const parts = s.partitions.slice().sort((a, b) => a.topic.localeCompare(b.topic) || a.partition - b.partition);
    const max = Math.max(1, ...parts.map((p) => p.lag));
    hbarChart($("lag"), parts.map((p) => ({
      key: `${p.topic}/${p.partition}`, label: `${p.topic.split(".")[0]} / ${p.partition}`, value: p.lag,
      shown: fmt(p.lag), max: max, cls: p.lag === 0 ? "good" : "warn",
      title: `${p.topic} partition ${p.partition}: committed ${fmt(p.committed)}, end ${fmt(p.end)}, lag ${fmt(p.lag)}`,
      data: {"data-topic": p.topic, "data-partition": p.partition, "data-committed": p.committed === null ? "" : p.committed,
             "data-end": p.end}})));
  }

  function renderAlerts(d) {
    const box = $("alerts");
    if (!d.alerts.length) {
      return empty(box, "No alerts", d.redis.ok ? "No anomaly rule has raised anything in this stream."
        : "Redis did not answer: " + d.redis.error, d.redis.ok);
    }
    clear(box);
    // Three significant digits: a range of 24.014-454.624 reads as 24.0-455.
    const num = (v) => fmt(Number(Number(v).toPrecision(3)));
    const span = (s) => (s >= 60 ? `${Math.round(s / 60)} min` : `${s} s`);
    const rows = d.alerts.map((a) => {
      const at = toMs(a.created_at), start = toMs(a.window_start);
      const range = a.expected_low === undefined ? "" :
        ` (expected ${num(a.expected_low)}–${num(a.expected_high)})`;
      return html("tr", {class: "alert", "data-kind": a.kind || "", "data-status": a.status || ""}, [
        html("td", {}, isNaN(at) ? "" : hhmmss(at)),
        html("td", {}, html("span", {class: "sev " + (a.severity || "INFO")}, a.severity || "?")),
        html("td", {class: "status-" + (a.status || "")}, a.status || ""),
        html("td", {}, a.kind || ""),
        html("td", {}, `${a.entity_type || ""} ${a.entity_id || ""}`),
        html("td", {}, isNaN(start) ? "" : `${hhmm(start)}, ${span(a.window_seconds || 0)}`),
        html("td", {}, (a.observed === undefined ? "" : num(a.observed)) + range),
        html("td", {}, a.message || "")]);
    });
    box.append(html("table", {class: "alerts"}, [
      html("thead", {}, html("tr", {}, ["time", "severity", "status", "kind", "entity", "window", "observed",
                                        "message"].map((t) => html("th", {}, t)))),
      html("tbody", {}, rows)]));
  }

  function render(d) {
    const s = d.status;
    $("dashboard").dataset.snapshot = JSON.stringify(s);
    renderTiles(d, s);
    renderCharts(d);
    renderHardest(d);
    renderDeadLetters(s);
    renderLag(s);
    renderAlerts(d);
  }

  let polls = 0;

  async function poll() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    const live = $("live");
    try {
      const r = await fetch("/dashboard/data", {cache: "no-store", signal: ctl.signal});
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      polls += 1;
      document.body.dataset.polls = String(polls);
      live.className = "live ok";
      live.textContent = "live";
      $("updated").textContent = "updated " + hhmmss(Date.now());
    } catch (e) {
      live.className = "live stale";
      live.textContent = "no answer (" + (e.name === "AbortError" ? "timeout" : e.message) + "), retrying";
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);   // the next poll starts after this one ended: never two at once
    }
  }

  document.addEventListener("DOMContentLoaded", poll);
})();
