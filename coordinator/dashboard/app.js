// flamingo's dashboard: plain JavaScript and SVG, served by the coordinator
// from its own binary (no CDN, works offline). `/` lists jobs; `/?job=A`
// shows a job, `/?job=A,B` overlays several.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
const EVENT_COLOURS = {
  restart: "#c62828", preempted: "#ef6c00", grow: "#6a1b9a", checkpoint: "#2e7d32",
  node_lost: "#ad1457",
  samples_skipped: "#9a6700", finished: "#0b5cad", scheduled: "#546e7a", submitted: "#546e7a",
  eval: "#00838f",
};
// Events drawn on the charts (rank starts and exits only go in the list;
// samples_skipped only comes when a dataset's skip rate jumps: the rate
// itself is the "Data" chart).
const TIMELINE_KINDS = new Set(["restart", "preempted", "grow", "checkpoint",
  "samples_skipped", "node_lost", "finished", "eval"]);
const TERMINAL = new Set(["Succeeded", "Failed", "Stopped"]);

const CHARTS = [
  { id: "loss", title: "Loss", names: ["loss_laion", "loss_mmc4"], smooth: true },
  { id: "lr", title: "Learning rate", names: ["lr"] },
  { id: "grad_norm", title: "Gradient norm", names: ["grad_norm"], smooth: true },
  { id: "samples_per_second", title: "Samples per second", names: ["samples_per_second"] },
  { id: "tokens_per_second", title: "Tokens per second", names: ["tokens_per_second"] },
  { id: "skipped", title: "Data: % of the samples read that were skipped",
    names: ["skip_rate_laion", "skip_rate_mmc4"], skips: true, smooth: true, scale: 100 },
  { id: "mfu", title: "MFU (model FLOPs utilisation)", names: ["mfu"],
    empty: "no MFU reported: launch with --peak_tflops (the device's peak TFLOP/s)" },
  { id: "step_time", title: "Step time per rank (s)", names: ["step_seconds"], perRank: true },
  { id: "data_wait", title: "Data wait per rank (s)", names: ["data_wait_seconds"], perRank: true },
  { id: "memory", title: "Memory per rank (GiB)", names: ["memory_bytes"], perRank: true,
    scale: 1 / 2 ** 30 },
];
// What each series measures: a chart draws series of one unit only on its
// one y axis (the browser test checks every chart).
const UNITS = {
  loss_laion: "nats per token", loss_mmc4: "nats per token", lr: "learning rate",
  grad_norm: "gradient norm", samples_per_second: "samples/s", tokens_per_second: "tokens/s",
  mfu: "fraction of peak", step_seconds: "s", data_wait_seconds: "s", memory_bytes: "bytes",
  skip_rate_laion: "% of samples read", skip_rate_mmc4: "% of samples read",
};
const RANK0_NAMES = CHARTS.filter((c) => !c.perRank).flatMap((c) => c.names);
const PER_RANK_NAMES = CHARTS.filter((c) => c.perRank).flatMap((c) => c.names);

const params = new URLSearchParams(location.search);
const view = {
  smoothing: clamp(Number(params.get("smoothing") ?? 0.6), 0, 0.999),
  y: params.get("y") === "log" ? "log" : "linear",
  x: params.get("x") === "time" ? "time" : "step",
  data: null,
  timer: null,
};

function clamp(value, low, high) {
  return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : low;
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function s(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`${url}: ${response.status} ${body.error || ""}`);
  }
  return response.json();
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

function setLive(running) {
  const live = document.getElementById("live");
  live.textContent = running ? `live · updated ${new Date().toLocaleTimeString()}` : "";
}

function schedule(refresh, running) {
  clearTimeout(view.timer);
  setLive(running);
  if (running) view.timer = setTimeout(refresh, REFRESH_MS);
}

// ------------------------------------------------------------ jobs list

async function showJobs() {
  const main = document.getElementById("main");
  let jobs;
  try {
    jobs = (await getJSON("/api/jobs")).jobs;
  } catch (error) {
    main.replaceChildren(h("p", { class: "error" }, String(error)));
    schedule(showJobs, true);
    return;
  }
  const checked = new Set([...document.querySelectorAll("input.pick:checked")].map((i) => i.value));
  const compare = h("button", {
    onclick: () => {
      const picked = [...document.querySelectorAll("input.pick:checked")].map((i) => i.value);
      if (picked.length) location.search = `?job=${picked.join(",")}`;
    },
  }, "Compare selected");
  const rows = jobs.slice().reverse().map((job) => h("tr", { "data-job": job.id },
    h("td", {}, h("input", { type: "checkbox", class: "pick", value: job.id,
      ...(checked.has(job.id) ? { checked: "" } : {}) })),
    h("td", {}, h("a", { href: `/?job=${encodeURIComponent(job.id)}` }, job.id)),
    h("td", {}, job.name),
    h("td", {}, job.kind),
    h("td", { class: `state state-${job.state}` }, job.state),
    h("td", {}, job.last_step),
    h("td", {}, `${job.attempt} / ${job.restarts}`),
    h("td", {}, `${job.placed_nodes || job.nodes} × ${job.world_size / Math.max(1, job.nodes)}`),
    h("td", {}, when(job.created_unix_ms)),
  ));
  main.replaceChildren(
    h("h2", {}, "Jobs"),
    jobs.length ? h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["", "job", "name", "kind", "state", "step",
        "attempt / restarts", "nodes × slots", "created"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)) : h("p", { class: "muted" }, "No jobs yet: flamingoctl launch …"),
    h("p", {}, compare),
  );
  schedule(showJobs, true);
}

// ------------------------------------------------------------ a job (or several)

async function fetchJob(id) {
  const base = `/api/jobs/${encodeURIComponent(id)}`;
  const [job, rank0, perRank, events, evals, skips] = await Promise.all([
    getJSON(base),
    getJSON(`${base}/series?ranks=0&names=${RANK0_NAMES.join(",")}&max_points=2000`),
    getJSON(`${base}/series?names=${PER_RANK_NAMES.join(",")}&max_points=400`),
    getJSON(`${base}/events`),
    getJSON(`${base}/evals`),
    getJSON(`${base}/skips`),
  ]);
  return { job, series: rank0.series.concat(perRank.series), events: events.events,
    evals: evals.evals, skips: skips.reasons };
}

async function showJobsPage(ids) {
  const main = document.getElementById("main");
  try {
    view.data = await Promise.all(ids.map(fetchJob));
  } catch (error) {
    main.replaceChildren(h("p", { class: "error" }, String(error)));
    schedule(() => showJobsPage(ids), true);
    return;
  }
  document.getElementById("crumbs").textContent = ids.join(" vs ");
  if (!document.getElementById("charts")) buildJobsPage(main);
  render();
  const running = view.data.some((d) => !TERMINAL.has(d.job.state));
  schedule(() => showJobsPage(ids), running);
}

function buildJobsPage(main) {
  const smoothingValue = h("span", { id: "smoothing-value" }, view.smoothing.toFixed(2));
  const controls = h("div", { class: "controls" },
    h("label", {}, "Smoothing",
      h("input", { id: "smoothing", type: "range", min: "0", max: "0.99", step: "0.01",
        value: String(view.smoothing), oninput: (e) => {
          view.smoothing = Number(e.target.value);
          smoothingValue.textContent = view.smoothing.toFixed(2);
          update();
        } }), smoothingValue),
    h("label", {}, "Y axis",
      h("select", { id: "y-scale", onchange: (e) => { view.y = e.target.value; update(); } },
        h("option", { value: "linear", ...(view.y === "linear" ? { selected: "" } : {}) }, "linear"),
        h("option", { value: "log", ...(view.y === "log" ? { selected: "" } : {}) }, "log"))),
    h("label", {}, "X axis",
      h("select", { id: "x-axis", onchange: (e) => { view.x = e.target.value; update(); } },
        h("option", { value: "step", ...(view.x === "step" ? { selected: "" } : {}) }, "step"),
        h("option", { value: "time", ...(view.x === "time" ? { selected: "" } : {}) },
          "wall time (s since start)"))),
  );
  main.replaceChildren(
    h("div", { id: "summary" }),
    controls,
    h("div", { class: "grid", id: "charts" },
      CHARTS.map(chartCard),
      // Benchmark scores of the job's checkpoints, one card per benchmark
      // (made as reports arrive); this one stands in until the first.
      chartCard(EVAL_PLACEHOLDER)),
    h("div", { class: "card", style: "margin-top:14px" }, h("h3", {}, "Events"),
      h("ul", { class: "events", id: "events" })),
  );
  window.addEventListener("resize", render);
}

function chartCard(chart) {
  return h("div", { class: "card", id: `card-${chart.id}` },
    h("h3", {}, chart.title),
    h("div", { class: "legend" }),
    svgChart(chart.id),
    h("div", { class: "tip" }),
    chart.perRank ? h("div", { class: "stragglers" }) : "",
    chart.evals ? h("div", { class: "eval-table" }) : "",
    chart.skips ? h("div", { class: "skip-table" }) : "");
}

function svgChart(id) {
  const svg = s("svg", { class: "chart", "data-chart": id });
  return svg;
}

function update() {
  const next = new URLSearchParams(location.search);
  next.set("smoothing", String(view.smoothing));
  next.set("y", view.y);
  next.set("x", view.x);
  history.replaceState(null, "", `?${next.toString().replace(/%2C/g, ",")}`);
  render();
}

/// TensorBoard's smoothing: an exponential moving average debiased by the
/// weight of its start, so the first points are not pulled towards zero.
function smooth(values, weight) {
  if (weight <= 0) return values.slice();
  let last = 0;
  let count = 0;
  return values.map((value) => {
    if (!Number.isFinite(value)) return value;
    count += 1;
    last = last * weight + (1 - weight) * value;
    return last / (1 - weight ** count);
  });
}

function startOf(data) {
  const times = data.series.flatMap((series) => series.points.length ? [series.points[0][1]] : []);
  return Math.min(data.job.started_unix_ms || Infinity, ...times);
}

function render() {
  if (!view.data) return;
  const overlay = view.data.length > 1;
  for (const chart of CHARTS) {
    const lines = [];
    const markers = [];
    view.data.forEach((data, jobIndex) => {
      const start = startOf(data);
      const xOf = (step, ms) => view.x === "step" ? step : (ms - start) / 1000;
      for (const series of data.series) {
        if (!chart.names.includes(series.name)) continue;
        if (!chart.perRank && series.rank !== 0) continue;
        const scale = chart.scale || 1;
        const points = series.points.map(([step, ms, value, attempt]) =>
          ({ x: xOf(step, ms), y: value * scale, step, value, attempt }));
        const label = [overlay ? data.job.id : "", chart.perRank ? `rank ${series.rank}`
          : (chart.names.length > 1 ? series.name : "")].filter(Boolean).join(" · ")
          || series.name;
        lines.push({ job: data.job.id, jobIndex, name: series.name, rank: series.rank,
          total: series.total, points, label });
      }
      for (const event of data.events) {
        if (!TIMELINE_KINDS.has(event.kind)) continue;
        const x = view.x === "step" ? event.step : (event.unix_ms - start) / 1000;
        if (x === undefined || x === null) continue;
        markers.push({ x, kind: event.kind, message: event.message });
      }
    });
    colour(lines, chart, overlay);
    const card = document.getElementById(`card-${chart.id}`);
    draw(card, lines, markers, chart);
  }
  renderEvals(overlay);
  renderSkips(overlay);
  renderSummary();
  renderEvents();
}

// ------------------------------------------------------------ eval scores

const EVAL_PLACEHOLDER = { id: "eval", title: "Evaluation", names: [], evals: true, dots: true,
  empty: "no eval scores yet: flamingoctl eval --job JOB --dataset coco ..." };

/// One chart per benchmark (dataset, metric, how demonstrations were
/// chosen), over every job shown.
function evalCharts() {
  const charts = new Map();
  for (const data of view.data) {
    for (const record of data.evals || []) {
      const key = `${record.dataset}|${record.metric}|${record.selection}`;
      if (charts.has(key)) continue;
      const slug = key.toLowerCase().replace(/[^a-z0-9]+/g, "-");
      charts.set(key, { id: `eval-${slug}`, key, names: [], evals: true, dots: true,
        dataset: record.dataset, metric: record.metric, selection: record.selection,
        title: `Eval: ${record.dataset}, ${record.metric} (${record.selection} demonstrations)` });
    }
  }
  return [...charts.values()].sort((a, b) => a.key.localeCompare(b.key));
}

/// Each job's scores for one benchmark: shots → step → the latest report.
function evalScores(data, chart) {
  const byShots = new Map();
  for (const record of data.evals || []) {
    if (`${record.dataset}|${record.metric}|${record.selection}` !== chart.key) continue;
    for (const score of record.scores) {
      if (!byShots.has(score.shots)) byShots.set(score.shots, new Map());
      byShots.get(score.shots).set(record.step, { ...score, step: record.step,
        unix_ms: record.unix_ms, samples: record.samples });
    }
  }
  return byShots;
}

/// When rank 0 reached `step` (for the wall-time axis), else `fallback`.
function timeOfStep(data, step, fallback) {
  for (const name of ["loss_laion", "loss_mmc4"]) {
    const series = data.series.find((x) => x.name === name && x.rank === 0);
    const point = series && series.points.find((p) => p[0] === step);
    if (point) return point[1];
  }
  return fallback;
}

/// The first and last x of rank 0's loss curves: eval charts span them too,
/// so their steps line up with the loss chart's.
function lossExtent(data) {
  const start = startOf(data);
  const xs = [];
  for (const name of ["loss_laion", "loss_mmc4"]) {
    const series = data.series.find((x) => x.name === name && x.rank === 0);
    if (!series || !series.points.length) continue;
    for (const p of [series.points[0], series.points[series.points.length - 1]]) {
      xs.push(view.x === "step" ? p[0] : (p[1] - start) / 1000);
    }
  }
  return xs;
}

function renderEvals(overlay) {
  const charts = evalCharts();
  const grid = document.getElementById("charts");
  document.getElementById("card-eval").hidden = charts.length > 0;
  // New benchmarks get a card after the loss chart, in name order.
  let after = document.getElementById("card-loss");
  for (const chart of charts) {
    let card = document.getElementById(`card-${chart.id}`);
    if (!card) card = chartCard(chart);
    if (after.nextSibling !== card) grid.insertBefore(card, after.nextSibling);
    after = card;
  }
  for (const chart of charts.length ? charts : [EVAL_PLACEHOLDER]) {
    const lines = [];
    const rows = [];
    view.data.forEach((data, jobIndex) => {
      const start = startOf(data);
      const byShots = evalScores(data, chart);
      for (const [shots, bySteps] of [...byShots].sort((a, b) => a[0] - b[0])) {
        const points = [...bySteps.values()].sort((a, b) => a.step - b.step).map((score) => ({
          x: view.x === "step" ? score.step
            : (timeOfStep(data, score.step, score.unix_ms) - start) / 1000,
          y: score.mean, step: score.step, value: score.mean, attempt: 0,
          stddev: score.stddev, trials: score.trials.length }));
        const label = `${overlay ? data.job.id + " · " : ""}${shots} shots`;
        lines.push({ job: data.job.id, jobIndex, name: `${shots} shots`, rank: 0,
          total: points.length, points, label, shots });
      }
      const steps = [...new Set([...byShots.values()].flatMap((m) => [...m.keys()]))]
        .sort((a, b) => b - a);
      for (const step of steps) rows.push({ job: data.job.id, step, byShots });
    });
    lines.forEach((line, index) => { line.colour = PALETTE[index % PALETTE.length]; });
    const card = document.getElementById(`card-${chart.id}`);
    chart.extraX = view.data.flatMap(lossExtent);
    draw(card, lines, [], chart);
    renderEvalTable(card, chart, rows, overlay);
  }
}

/// The scores as a table: a row per checkpoint (newest first), a column
/// per shot count, `mean ± stddev` over the trials.
function renderEvalTable(card, chart, rows, overlay) {
  const shots = [...new Set(rows.flatMap((row) => [...row.byShots.keys()]))].sort((a, b) => a - b);
  const place = card.querySelector(".eval-table");
  if (!rows.length) { place.replaceChildren(); return; }
  place.replaceChildren(h("table", { class: "evals", "data-chart": chart.id },
    h("thead", {}, h("tr", {}, overlay ? h("th", {}, "job") : "", h("th", {}, "step"),
      ...shots.map((n) => h("th", {}, `${n} shots`)))),
    h("tbody", {}, ...rows.map((row) => h("tr", { "data-job": row.job, "data-step": String(row.step) },
      overlay ? h("td", {}, row.job) : "",
      h("td", {}, String(row.step)),
      ...shots.map((n) => {
        const score = row.byShots.get(n) && row.byShots.get(n).get(row.step);
        return h("td", score ? { "data-shots": String(n), "data-mean": String(score.mean) } : {},
          score ? `${format(score.mean)}${score.trials.length > 1 ? " ± " + format(score.stddev) : ""}`
            : "–");
      }))))));
}

/// Why samples were skipped: a row per dataset and reason, most frequent
/// first, with the count over the job and a few examples (shard and key).
function renderSkips(overlay) {
  const place = document.querySelector("#card-skipped .skip-table");
  if (!place) return;
  const rows = view.data.flatMap((data) => (data.skips || []).map((row) => ({ ...row, job: data.job.id })));
  if (!rows.length) {
    place.replaceChildren(h("p", { class: "muted" }, "no samples skipped"));
    return;
  }
  const shard = (url) => url.slice(url.lastIndexOf("/") + 1);
  place.replaceChildren(h("table", { class: "skips" },
    h("thead", {}, h("tr", {}, overlay ? h("th", {}, "job") : "", h("th", {}, "dataset"),
      h("th", {}, "reason"), h("th", {}, "samples"), h("th", {}, "examples"))),
    h("tbody", {}, ...rows.map((row) => h("tr",
      { "data-job": row.job, "data-dataset": row.dataset, "data-reason": row.reason,
        "data-count": String(row.count) },
      overlay ? h("td", { class: "job" }, row.job) : "",
      h("td", {}, row.dataset),
      h("td", {}, row.reason.replace(/_/g, " ")),
      h("td", { class: "num" }, row.count.toLocaleString()),
      h("td", { class: "examples" }, ...row.examples.map((example) =>
        h("div", { title: `${example.shard} ${example.key}: ${example.detail} (step ${example.step})` },
          h("code", {}, `${shard(example.shard)} ${example.key}`), ` ${example.detail}`))))))));
}

function colour(lines, chart, overlay) {
  if (chart.perRank) {
    const stragglers = findStragglers(lines);
    lines.forEach((line, index) => {
      line.straggler = stragglers.has(line);
      line.colour = line.straggler ? "#d62728"
        : overlay ? PALETTE[line.jobIndex % PALETTE.length] : `hsl(${(index * 47) % 360} 35% 55%)`;
    });
    return;
  }
  lines.forEach((line, index) => {
    line.colour = PALETTE[(overlay ? line.jobIndex * chart.names.length
      + chart.names.indexOf(line.name) : index) % PALETTE.length];
  });
}

function median(values) {
  if (!values.length) return NaN;
  const sorted = values.slice().sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/// Ranks whose recent step time is well above their job's median rank.
function findStragglers(lines) {
  const out = new Set();
  const byJob = new Map();
  for (const line of lines) {
    const recent = median(line.points.slice(-50).map((p) => p.y));
    line.recent = recent;
    if (!byJob.has(line.job)) byJob.set(line.job, []);
    byJob.get(line.job).push(line);
  }
  for (const group of byJob.values()) {
    if (group.length < 2) continue;
    const typical = median(group.map((line) => line.recent));
    for (const line of group) if (line.recent > typical * 1.25 && line.recent - typical > 1e-3) {
      line.ratio = line.recent / typical;
      out.add(line);
    }
  }
  return out;
}

function niceTicks(low, high, count) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((m) => raw <= m) || 10 * power;
  const ticks = [];
  for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function format(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1e5 || magnitude < 1e-3) return value.toExponential(1);
  return Number(value.toPrecision(4)).toString();
}

function draw(card, lines, markers, chart) {
  const svg = card.querySelector("svg");
  const legend = card.querySelector(".legend");
  const width = Math.max(300, svg.getBoundingClientRect().width || 520);
  const height = 240;
  const pad = { left: 58, right: 12, top: 8, bottom: 24 };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  legend.replaceChildren(...lines.map((line) => h("span", { style: `--c:${line.colour}` },
    line.label + (line.total > line.points.length ? ` (${line.points.length} of ${line.total})` : ""))));
  const log = view.y === "log";
  const smoothing = chart.smooth ? view.smoothing : 0;
  for (const line of lines) line.smoothed = smooth(line.points.map((p) => p.y), smoothing);
  const usable = (y) => Number.isFinite(y) && (!log || y > 0);
  const xs = lines.flatMap((line) => line.points.map((p) => p.x)).concat(chart.extraX || [])
    .filter(Number.isFinite);
  const ys = lines.flatMap((line) => line.points.map((p) => p.y).concat(line.smoothed))
    .filter(usable);
  if (!xs.length || !ys.length) {
    svg.append(textAt(width / 2, height / 2, chart.empty || "no data yet", "middle"));
    card.querySelector(".tip").textContent = "";
    return;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (log) { y0 = Math.log10(y0); y1 = Math.log10(y1); }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const margin = (y1 - y0) * 0.05;
  y0 -= margin; y1 += margin;
  const px = (x) => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const py = (y) => pad.top + (1 - ((log ? Math.log10(y) : y) - y0) / (y1 - y0))
    * (height - pad.top - pad.bottom);
  // Axes and ticks.
  const yTicks = log
    ? niceTicks(y0, y1, 4).map((t) => 10 ** t)
    : niceTicks(y0, y1, 5);
  for (const t of yTicks) {
    const y = py(t);
    if (!(y >= pad.top - 1 && y <= height - pad.bottom + 1)) continue;
    svg.append(s("line", { class: "gridline", x1: pad.left, x2: width - pad.right, y1: y, y2: y }));
    svg.append(textAt(pad.left - 4, y + 3, format(t), "end"));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    const x = px(t);
    svg.append(s("line", { class: "gridline", x1: x, x2: x, y1: pad.top, y2: height - pad.bottom }));
    svg.append(textAt(x, height - 8, format(t), "middle"));
  }
  svg.append(s("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top,
    y2: height - pad.bottom }));
  svg.append(s("line", { class: "axis", x1: pad.left, x2: width - pad.right,
    y1: height - pad.bottom, y2: height - pad.bottom }));
  // Events and checkpoints on the timeline.
  for (const marker of markers) {
    if (!(marker.x >= x0 && marker.x <= x1)) continue;
    const line = s("line", { class: "event", "data-kind": marker.kind,
      "data-x": String(marker.x), x1: px(marker.x),
      x2: px(marker.x), y1: pad.top, y2: height - pad.bottom,
      stroke: EVENT_COLOURS[marker.kind] || "#888" });
    const title = s("title");
    title.textContent = marker.message;
    line.append(title);
    svg.append(line);
  }
  // The curves: one path per line, broken where a restart rewinds.
  for (const line of lines) {
    const path = (values) => {
      let d = "";
      let previous = null;
      line.points.forEach((p, i) => {
        const y = values[i];
        if (!usable(y) || !Number.isFinite(p.x)) { previous = null; return; }
        const restart = previous && previous.attempt !== p.attempt;
        d += `${previous && !restart ? "L" : "M"}${px(p.x).toFixed(1)},${py(y).toFixed(1)}`;
        previous = p;
      });
      return d;
    };
    if (smoothing > 0) {
      svg.append(s("path", { class: "raw", d: path(line.points.map((p) => p.y)),
        stroke: line.colour }));
    }
    svg.append(s("path", {
      class: "series", d: path(line.smoothed), stroke: line.colour,
      "stroke-width": line.straggler ? 2.5 : 1.5,
      "data-job": line.job, "data-name": line.name, "data-rank": String(line.rank),
      "data-unit": UNITS[line.name] || (chart.evals ? "score" : "unknown"),
      "data-total": String(line.total),
      // The curve's stored points as the server sent them (unsmoothed).
      "data-points": JSON.stringify(line.points.map((p) => [p.step, p.value])),
    }));
  }
  // Sparse points (eval scores) get a dot each, with their value on hover.
  if (chart.dots) {
    for (const line of lines) {
      for (const p of line.points) {
        if (!usable(p.y) || !Number.isFinite(p.x)) continue;
        const dot = s("circle", { class: "dot", cx: px(p.x).toFixed(1), cy: py(p.y).toFixed(1),
          r: 3, fill: line.colour, "data-step": String(p.step), "data-value": String(p.value) });
        const title = s("title");
        title.textContent = `${line.label} at step ${p.step}: ${format(p.value)}`
          + (p.trials > 1 ? ` ± ${format(p.stddev)} over ${p.trials} trials` : "");
        dot.append(title);
        svg.append(dot);
      }
    }
  }
  const cursor = s("line", { class: "cursor", y1: pad.top, y2: height - pad.bottom,
    visibility: "hidden" });
  svg.append(cursor);
  const tip = card.querySelector(".tip");
  svg.onmousemove = (event) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((event.clientX - box.left) * (width / box.width) - pad.left)
      / (width - pad.left - pad.right) * (x1 - x0);
    cursor.setAttribute("x1", px(x));
    cursor.setAttribute("x2", px(x));
    cursor.setAttribute("visibility", "visible");
    tip.textContent = lines.slice(0, 8).map((line) => {
      const i = nearest(line.points, x);
      if (i < 0) return "";
      const p = line.points[i];
      return `${line.label}: ${format(line.smoothed[i])} @ ${view.x === "step" ? "step " + p.step
        : format(p.x) + " s"}`;
    }).filter(Boolean).join("   ");
  };
  svg.onmouseleave = () => { cursor.setAttribute("visibility", "hidden"); };
  const stragglers = card.querySelector(".stragglers");
  if (stragglers) {
    const slow = lines.filter((line) => line.straggler);
    stragglers.textContent = slow.length ? "stragglers: " + slow.map((line) =>
      `${view.data.length > 1 ? line.job + " " : ""}rank ${line.rank} (${line.ratio.toFixed(2)}× median)`)
      .join(", ") : "";
  }
}

function nearest(points, x) {
  let best = -1;
  let distance = Infinity;
  points.forEach((p, i) => {
    const d = Math.abs(p.x - x);
    if (d < distance) { distance = d; best = i; }
  });
  return best;
}

function textAt(x, y, text, anchor) {
  const node = s("text", { class: "tick", x, y, "text-anchor": anchor });
  node.textContent = text;
  return node;
}

function renderSummary() {
  const summary = document.getElementById("summary");
  summary.replaceChildren(...view.data.map((data) => {
    const job = data.job;
    const latest = (name) => {
      const series = data.series.find((x) => x.name === name && x.rank === 0);
      const last = series && series.points[series.points.length - 1];
      return last ? format(last[2]) : "–";
    };
    return h("div", { class: "summary", "data-job": job.id },
      h("span", {}, h("b", {}, job.id), ` ${job.name}`),
      h("span", { class: `state state-${job.state}`, id: `state-${job.id}` }, job.state),
      h("span", {}, "step ", h("b", { class: "step" }, job.last_step)),
      h("span", {}, `attempt ${job.attempt} · ${job.restarts} restart(s)`),
      h("span", {}, `${job.checkpoints.length} checkpoint(s) kept`
        + (job.checkpoints.length ? ` · latest step ${job.checkpoints[job.checkpoints.length - 1].step}` : "")),
      h("span", {}, `loss laion ${latest("loss_laion")} · mmc4 ${latest("loss_mmc4")}`),
      h("span", {}, `${latest("samples_per_second")} samples/s`),
      job.message ? h("span", { class: "muted" }, job.message) : "",
    );
  }));
}

function renderEvents() {
  const list = document.getElementById("events");
  const events = view.data.flatMap((data) => data.events.map((event) => ({ ...event, job: data.job.id })))
    .sort((a, b) => b.unix_ms - a.unix_ms);
  list.replaceChildren(...events.slice(0, 500).map((event) => h("li", { "data-kind": event.kind },
    h("span", { class: "kind", style: `color:${EVENT_COLOURS[event.kind] || "inherit"}` }, event.kind),
    `${new Date(event.unix_ms).toLocaleTimeString()} `,
    view.data.length > 1 ? `${event.job}: ` : "",
    event.step !== undefined ? `step ${event.step}: ` : "",
    event.message)));
}

const jobParam = params.get("job");
if (jobParam) {
  showJobsPage(jobParam.split(",").map((id) => id.trim()).filter(Boolean));
} else {
  showJobs();
}
