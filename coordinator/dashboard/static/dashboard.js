// The operator's page: renders a job's state (coordinator/dashboard/snapshot.py) and, when served,
// follows it over server-sent events. Every text from the store goes in as textContent: refusal
// reasons and device ids come from devices, and must never be read as HTML.
"use strict";
(function () {
  const MIB = 1048576;
  let state = null;
  let receivedAt = 0;  // this browser's clock when the state arrived (open rounds count on from it)
  window.dashboardRenders = 0;

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  const fixed = (x, digits) => (x === null || x === undefined ? "-" : x.toFixed(digits));
  const count = (x) => (x === null || x === undefined ? "-" : x.toLocaleString("en-US"));
  function bytes(x) {
    if (x === null || x === undefined) return "-";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    return (i === 0 ? x : x.toFixed(1)) + " " + units[i];
  }
  // MiB as `coordinator status` prints them (Python's format: a tie goes to the even integer; memory
  // peaks are whole pages, so ties happen).
  function mib(b) {
    const x = b / MIB, whole = Math.floor(x), rest = x - whole;
    return String(rest > 0.5 || (rest === 0.5 && whole % 2 === 1) ? whole + 1 : whole);
  }
  const utc = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }
  function row(cells, attrs) {
    const tr = el("tr", null, attrs);
    for (const [field, text, cls] of cells) {
      tr.appendChild(el("td", text, Object.assign({"data-field": field}, cls ? {class: cls} : {})));
    }
    return tr;
  }
  function elapsed(r) {
    if (r.seconds !== null) return r.seconds;
    return state.now - r.opened_at + (Date.now() / 1000 - receivedAt);
  }

  function renderHeader() {
    const job = state.job;
    document.getElementById("job-id").textContent = "job " + job.id;
    const badge = document.getElementById("job-status");
    badge.textContent = job.status;
    badge.dataset.status = job.status;
    const connected = state.devices.filter((d) => d.state === "connected").length;
    document.getElementById("summary").textContent =
      `method ${job.method} · ${job.closed_rounds}/${job.rounds} rounds closed · ` +
      `${job.devices_per_round} devices per round (min ${job.min_devices}) · ` +
      `${connected} of ${state.devices.length} devices connected`;
  }

  function renderRounds() {
    const rows = state.rounds.map((r) => row([
      ["round", r.number], ["attempt", r.attempt], ["status", r.status],
      ["version", r.version === null ? "-" : r.version], ["method", r.method], ["updates", r.updates],
      ["waves", r.waves], ["seconds", fixed(elapsed(r), 1)], ["forward_passes", count(r.forward_passes)],
      ["peak_mib", mib(r.peak_bytes)],
      ["heldout_loss", fixed(r.metrics.heldout_loss, 4)], ["heldout_accuracy", fixed(r.metrics.heldout_accuracy, 4)],
      ["reason", r.reason || "", "text"],
    ], {"data-round": r.number, "data-attempt": r.attempt, "data-status": r.status}));
    fill(document.querySelector("#rounds tbody"), rows);
  }

  function renderPlot() {
    const series = state.metrics;
    const traces = [];
    const names = {heldout_loss: "held-out loss", heldout_accuracy: "held-out accuracy"};
    for (const name of ["heldout_loss", "heldout_accuracy"]) {
      if (!series[name]) continue;
      traces.push({
        name: names[name], x: series[name].map((p) => p[0]), y: series[name].map((p) => p[1]),
        mode: "lines+markers", type: "scatter", yaxis: name === "heldout_accuracy" ? "y2" : "y",
      });
    }
    const best = state.best;
    if (best) {
      traces.push({name: `best (version ${best.version})`, x: [best.version], y: [best.value], mode: "markers",
                   type: "scatter", marker: {symbol: "star", size: 14, color: "#e0a800"},
                   yaxis: best.metric === "heldout_accuracy" ? "y2" : "y"});
    }
    const layout = {
      margin: {l: 60, r: 60, t: 10, b: 45},
      xaxis: {title: {text: "round (0: the start)"}, tickformat: "d", dtick: state.job.rounds <= 20 ? 1 : undefined},
      yaxis: {title: {text: "held-out loss"}}, legend: {orientation: "h", y: -0.25},
      yaxis2: {title: {text: "held-out accuracy"}, overlaying: "y", side: "right", showgrid: false, tickmode: "auto"},
      paper_bgcolor: "#fafbfc", plot_bgcolor: "#ffffff",
    };
    if (!series.heldout_accuracy) delete layout.yaxis2;
    window.Plotly.react("plot", traces, layout, {displaylogo: false, responsive: true});
    document.getElementById("best").textContent = best
      ? `best version: ${best.version} (${best.metric} ${best.value.toFixed(4)}); ` +
        "python -m coordinator export-adapter --version best writes it"
      : "no held-out metrics yet (serve with --eval-data)";
  }

  function memory(d) {
    const cell = el("td", null, {"data-field": "memory"});
    if (d.peak_bytes === null) {
      cell.textContent = "-";
      return cell;
    }
    if (d.budget_bytes) {
      const share = d.peak_bytes / d.budget_bytes;
      const bar = el("span", null, {class: "bar" + (share > 1 ? " over" : "")});
      bar.appendChild(el("span", null, {style: `width: ${Math.min(100, 100 * share).toFixed(0)}%`}));
      cell.appendChild(bar);
    }
    cell.appendChild(document.createTextNode(
      `${mib(d.peak_bytes)} MiB` + (d.budget_bytes ? ` / ${mib(d.budget_bytes)} MiB` : "")));
    return cell;
  }

  function renderDevices() {
    const rows = state.devices.map((d) => {
      const tr = row([
        ["id", d.id, "text"], ["state", d.state], ["first_seen", utc(d.first_seen)], ["examples", count(d.examples)],
        ["updates", d.updates],
        ["bytes_up", bytes(d.bytes_up)], ["bytes_down", bytes(d.bytes_down)],
      ], {"data-device": d.id, "data-state": d.state, "data-bytes-up": d.bytes_up ?? "",
          "data-bytes-down": d.bytes_down ?? ""});
      tr.appendChild(memory(d));
      tr.appendChild(el("td", d.refusals, {"data-field": "refusals"}));
      const last = d.last_refusal ? `${d.last_refusal.code}: ${d.last_refusal.reason}` : "";
      tr.appendChild(el("td", last, {"data-field": "last_refusal", class: "text"}));
      return tr;
    });
    fill(document.querySelector("#devices tbody"), rows);
  }

  function renderRefusals() {
    const codes = Object.entries(state.refusals.by_code);
    fill(document.querySelector("#refusal-codes tbody"), codes.length
      ? codes.map(([code, n]) => row([["code", code, "text"], ["count", n]], {"data-code": code}))
      : [row([["code", "none", "text"], ["count", 0]])]);
    fill(document.querySelector("#refusal-recent tbody"), state.refusals.recent.map((r) => row([
      ["at", utc(r.at)], ["device", r.device === null ? "(handshake)" : r.device, "text"], ["code", r.code, "text"],
      ["reason", r.reason, "text"]])));
  }

  function renderOptions() {
    const job = state.job;
    const entries = [["bundle", job.bundle], ["method", job.method], ["rounds", job.rounds],
      ["devices per round", job.devices_per_round], ["min devices", job.min_devices],
      ["round deadline (s)", job.round_deadline_s], ["adapter dimension", count(job.adapter_dim)],
      ["created (UTC)", utc(job.created_at)]];
    const shown = (v) => (typeof v === "string" ? v : JSON.stringify(v));
    for (const [k, v] of Object.entries(job.hparams)) entries.push([`task: ${k}`, shown(v)]);
    for (const [k, v] of Object.entries(job.options)) if (v !== null) entries.push([`job: ${k}`, shown(v)]);
    fill(document.querySelector("#options tbody"), entries.map(([k, v]) => {
      const tr = el("tr", null, {"data-option": k});
      tr.appendChild(el("th", k, {class: "text"}));
      tr.appendChild(el("td", v, {class: "text"}));
      return tr;
    }));
  }

  function render(next) {
    state = next;
    receivedAt = Date.now() / 1000;
    renderHeader();
    renderRounds();
    renderPlot();
    renderDevices();
    renderRefusals();
    renderOptions();
    window.dashboardState = state;
    window.dashboardRenders += 1;
  }

  function setLive(mode, text) {
    const live = document.getElementById("live");
    live.dataset.live = mode;
    live.textContent = text;
  }

  const embedded = document.getElementById("snapshot");
  if (embedded) {  // a static file: the state when it was written
    render(JSON.parse(embedded.textContent));
    setLive("static", `written ${utc(state.now)} UTC (a static copy: no live updates)`);
    return;
  }
  const source = new EventSource("api/events");
  source.addEventListener("state", (event) => {
    render(JSON.parse(event.data));
    setLive("live", `live · updated ${utc(state.now)} UTC`);
  });
  source.onerror = () => setLive("reconnecting", "connection lost: reconnecting… (the job may have ended)");
  setInterval(() => { if (state && state.rounds.some((r) => r.status === "open")) renderRounds(); }, 1000);
})();
