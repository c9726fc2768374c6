// The dashboard's page: follows the controller's live feed (Server-Sent Events) and draws it.
// No framework and no build step: rows are kept by key and updated in place, so a button under
// the pointer stays put while the page changes around it. Charts are uPlot.
"use strict";

(() => {
  const GIB = 1024 ** 3;
  const RECENT_ROWS = 12;
  const HOUR_S = 3600;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (selector, root = document) => root.querySelector(selector);

  // What the page keeps between messages: per GPU ("agent/index") its history and charts.
  const gpus = new Map();
  let lastState = null;
  let nowSkewMs = 0; // the server's clock less the browser's, from the latest message

  // -- formatting ---------------------------------------------------------------------------

  const gib = (bytes) => (bytes == null ? "–" : `${(bytes / GIB).toFixed(1)} GiB`);
  const shortId = (id) => id.slice(0, 8);
  function seconds(s) {
    if (s == null || !isFinite(s)) return "–";
    if (s < 0) s = 0;
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }
  const serverNow = () => Date.now() + nowSkewMs;
  const ago = (iso) => (serverNow() - Date.parse(iso)) / 1000;
  const until = (iso) => (Date.parse(iso) - serverNow()) / 1000;
  const kind = (job) => `${job.family || "?"} ${job.size}`;
  const span = (text, cls) => ({ text, cls });

  // -- keyed tables -------------------------------------------------------------------------

  function setCells(tr, values) {
    while (tr.cells.length < values.length) tr.insertCell();
    values.forEach((value, i) => {
      const td = tr.cells[i];
      if (value instanceof Node) {
        if (td.firstChild !== value) td.replaceChildren(value);
        return;
      }
      const cell = value !== null && typeof value === "object" ? value : { text: value };
      const text = cell.text == null ? "" : String(cell.text);
      if (td.textContent !== text) td.textContent = text;
      const cls = cell.cls || "";
      if (td.className !== cls) td.className = cls;
      if (cell.title !== undefined && td.title !== cell.title) td.title = cell.title;
    });
  }

  function sync(table, items, key, render) {
    const body = table.tBodies[0];
    const old = new Map([...body.rows].map((tr) => [tr.dataset.key, tr]));
    let previous = null;
    for (const item of items) {
      const k = key(item);
      let tr = old.get(k);
      if (tr) old.delete(k);
      else {
        tr = document.createElement("tr");
        tr.dataset.key = k;
      }
      render(tr, item);
      const next = previous ? previous.nextSibling : body.firstChild;
      if (next !== tr) body.insertBefore(tr, next);
      previous = tr;
    }
    for (const tr of old.values()) tr.remove();
  }

  // A button that asks once more before it acts: the first click arms it for a few seconds.
  function actionButton(tr, label, confirmLabel, act) {
    if (tr._button) return tr._button;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    let armed = null;
    button.addEventListener("click", async () => {
      if (!armed) {
        button.textContent = confirmLabel;
        button.classList.add("confirm");
        armed = setTimeout(() => {
          armed = null;
          button.textContent = label;
          button.classList.remove("confirm");
        }, 4000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      button.disabled = true;
      button.textContent = "…";
      button.classList.remove("confirm");
      try {
        await act();
      } finally {
        button.disabled = false;
        button.textContent = label;
      }
    });
    tr._button = button;
    return button;
  }

  // -- actions ------------------------------------------------------------------------------

  function notice(text) {
    const p = $("#notice");
    p.textContent = text;
    p.hidden = !text;
    if (text) setTimeout(() => { if (p.textContent === text) p.hidden = true; }, 8000);
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) location.assign("login");
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error.message; } catch { /* not JSON */ }
      notice(message);
      return null;
    }
    return response.json();
  }

  const cancelJob = (id) => post(`api/jobs/${encodeURIComponent(id)}/cancel`);
  const unloadModel = (agent, model) =>
    post(`api/agents/${encodeURIComponent(agent)}/unload`, { model });

  $("#logout").addEventListener("click", async () => {
    await post("logout");
    location.assign("login");
  });

  // -- charts -------------------------------------------------------------------------------

  function palette() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {
      fg: v("--fg"), muted: v("--muted"), grid: v("--grid"), budget: v("--c-budget"),
      desktop: v("--c-desktop"), ollama: v("--c-ollama"), comfyui: v("--c-comfyui"),
      other: v("--c-other"), util: v("--c-util"), temp: v("--c-temp"), power: v("--c-power"),
    };
  }

  // Until there is a minute of history, the time axis shows the last minute.
  const timeRange = (u, min, max) => {
    const end = max ?? serverNow() / 1000;
    return min == null || end - min < 60 ? [end - 60, end] : [min, max];
  };

  const axis = (c, extra = {}) => ({
    stroke: c.muted, grid: { stroke: c.grid, width: 1 }, ticks: { stroke: c.grid, width: 1 }, ...extra,
  });

  // The memory layers, bottom to top; drawn top layer first (each fills to zero), so the
  // stack reads bottom-up and each layer's legend shows its own share.
  const LAYERS = [
    ["desktop", "desktop"],
    ["ollama", "Ollama"],
    ["comfyui", "ComfyUI"],
    ["other", "other"],
  ];

  function memoryChart(el, g, c) {
    const layerValue = (layer) => (u, v, si, i) =>
      i == null ? "–" : `${g.hist[`${layer}_gib`][i].toFixed(2)} GiB`;
    const series = [{}];
    for (const [layer, label] of [...LAYERS].reverse()) {
      series.push({ label, stroke: c[layer], fill: c[layer], width: 1, points: { show: false },
                    value: layerValue(layer) });
    }
    series.push({ label: "budget", stroke: c.budget, width: 1.5, dash: [6, 4],
                  points: { show: false }, value: (u, v) => (v == null ? "–" : `${v.toFixed(1)} GiB`) });
    return new uPlot({
      width: Math.max(280, el.clientWidth), height: 210,
      scales: { x: { time: true, range: timeRange }, y: { range: () => [0, Math.max(1, g.totalGib * 1.04)] } },
      axes: [axis(c), axis(c, { size: 56, values: (u, vals) => vals.map((v) => `${v} GiB`) })],
      series, cursor: { drag: { x: false, y: false } }, legend: { live: true },
    }, memoryData(g), el);
  }

  function memoryData(g) {
    const h = g.hist;
    const layers = [];
    let running = h.t.map(() => 0);
    for (const [layer] of LAYERS) {
      running = running.map((sum, i) => sum + h[`${layer}_gib`][i]);
      layers.push(running);
    }
    return [h.t, ...layers.reverse(), h.budget_gib];
  }

  function loadChart(el, g, c) {
    return new uPlot({
      width: Math.max(280, el.clientWidth), height: 120,
      scales: { x: { time: true, range: timeRange }, pct: { range: [0, 100] }, W: { range: (u, lo, hi) => [0, Math.max(50, hi || 0) * 1.1] } },
      axes: [
        axis(c),
        axis(c, { scale: "pct", size: 56, values: (u, vals) => vals.map((v) => `${v}`) }),
        axis(c, { scale: "W", side: 1, size: 50, grid: { show: false }, values: (u, vals) => vals.map((v) => `${v} W`) }),
      ],
      series: [
        {},
        { label: "load %", scale: "pct", stroke: c.util, width: 1.5, points: { show: false } },
        { label: "temp °C", scale: "pct", stroke: c.temp, width: 1.5, points: { show: false } },
        { label: "power W", scale: "W", stroke: c.power, width: 1.5, points: { show: false } },
      ],
      cursor: { drag: { x: false, y: false } }, legend: { live: true },
    }, loadData(g), el);
  }

  const loadData = (g) => [g.hist.t, g.hist.utilization_percent, g.hist.temperature_c, g.hist.power_w];

  const COLUMNS = ["t", "desktop_gib", "ollama_gib", "comfyui_gib", "other_gib", "budget_gib",
                   "utilization_percent", "temperature_c", "power_w"];

  function emptyHistory() {
    return Object.fromEntries(COLUMNS.map((name) => [name, []]));
  }

  function addHistory(series, reset) {
    if (reset) for (const g of gpus.values()) g.hist = emptyHistory();
    for (const s of series) {
      const g = gpuEntry(s.agent, s.gpu);
      g.totalGib = s.total_gib;
      for (const name of COLUMNS) g.hist[name].push(...s[name]);
      // Keep the last hour only.
      const cutoff = g.hist.t[g.hist.t.length - 1] - HOUR_S;
      const drop = g.hist.t.findIndex((t) => t >= cutoff);
      if (drop > 0) for (const name of COLUMNS) g.hist[name].splice(0, drop);
      g.dirty = true;
    }
  }

  function gpuEntry(agent, index) {
    const key = `${agent}/${index}`;
    let g = gpus.get(key);
    if (!g) {
      g = { key, hist: emptyHistory(), totalGib: 1, el: null, memory: null, load: null, dirty: true };
      gpus.set(key, g);
    }
    return g;
  }

  function drawCharts() {
    if (typeof uPlot === "undefined") return;
    const c = palette();
    for (const g of gpus.values()) {
      if (!g.el || !g.dirty) continue;
      const memoryEl = $(".memory-chart", g.el);
      const loadEl = $(".load-chart", g.el);
      if (!g.memory) {
        g.memory = memoryChart(memoryEl, g, c);
        g.load = loadChart(loadEl, g, c);
      } else {
        g.memory.setData(memoryData(g));
        g.load.setData(loadData(g));
      }
      memoryEl.dataset.points = String(g.hist.t.length);
      g.dirty = false;
    }
  }

  function redrawAll() {
    for (const g of gpus.values()) {
      g.memory?.destroy();
      g.load?.destroy();
      g.memory = g.load = null;
      g.dirty = true;
    }
    drawCharts();
  }

  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", redrawAll);
  const resized = new ResizeObserver(() => {
    for (const g of gpus.values()) {
      if (!g.memory) continue;
      const width = Math.max(280, $(".memory-chart", g.el).clientWidth);
      if (width !== g.memory.width) {
        g.memory.setSize({ width, height: 210 });
        g.load.setSize({ width, height: 120 });
      }
    }
  });
  resized.observe(document.body);

  // -- agents -------------------------------------------------------------------------------

  function renderAgents(agents) {
    const root = $("#agents");
    const seen = new Set();
    for (const agent of agents) {
      seen.add(agent.name);
      let card = root.querySelector(`[data-agent="${CSS.escape(agent.name)}"]`);
      if (!card) {
        card = $("#agent-template").content.firstElementChild.cloneNode(true);
        card.dataset.agent = agent.name;
        root.append(card);
      }
      $(".agent-name", card).textContent = agent.name;
      const health = $(".health", card);
      health.textContent = agent.healthy ? "healthy" : "unhealthy";
      health.className = `badge health ${agent.healthy ? "ok" : "bad"}`;
      $(".reason", card).textContent = agent.reason ? `Why: ${agent.reason}` : "";
      $(".f-ollama", card).textContent = agent.ollama;
      $(".f-comfyui", card).textContent = agent.comfyui;
      $(".f-budget", card).textContent =
        `${gib(agent.used_bytes)} used + ${gib(agent.pending_bytes)} promised of ${gib(agent.budget_bytes)}` +
        (agent.draining ? " · an image job waits: no new LLM loads" : "");
      $(".f-age", card).textContent = agent.snapshot_at
        ? `${seconds(ago(agent.snapshot_at))} ago${agent.connected ? "" : " (link down)"}`
        : "none yet";
      renderGpus(card, agent);
      sync($(".resident", card), agent.resident, (m) => m.name, (tr, m) => {
        const button = actionButton(tr, "Unload", "Unload? click again",
                                    () => unloadModel(agent.name, m.name));
        button.disabled = !m.idle;
        button.title = m.idle ? "unload this idle model now" : "busy: only an idle model is unloaded";
        setCells(tr, [
          m.name + (m.offloaded ? " (partly on the CPU)" : ""),
          span(gib(m.vram_bytes), "num"),
          span(m.context_length ?? "–", "num"),
          span(m.expires_at ? seconds(until(m.expires_at)) : "never", "num"),
          span(m.in_flight, "num"),
          button,
        ]);
      });
    }
    for (const card of [...root.children]) if (!seen.has(card.dataset.agent)) card.remove();
  }

  function renderGpus(card, agent) {
    const holder = $(".gpus", card);
    for (const gpu of agent.gpus) {
      const g = gpuEntry(agent.name, gpu.index);
      if (!g.el || !holder.contains(g.el)) {
        g.el = $("#gpu-template").content.firstElementChild.cloneNode(true);
        g.el.dataset.gpu = g.key;
        holder.append(g.el);
        g.memory = g.load = null;
        g.dirty = true;
      }
      g.totalGib = gpu.total_bytes / GIB;
      $(".gpu-name", g.el).textContent = `GPU ${gpu.index}: ${gpu.name}`;
      $(".g-util", g.el).textContent = gpu.utilization_percent == null ? "–" : `${gpu.utilization_percent} %`;
      $(".g-temp", g.el).textContent = gpu.temperature_c == null ? "–" : `${gpu.temperature_c} °C`;
      $(".g-power", g.el).textContent = gpu.power_w == null ? "–"
        : `${Math.round(gpu.power_w)} / ${Math.round(gpu.power_limit_w || 0)} W`;
      $(".g-mem", g.el).textContent =
        `Ollama ${gib(gpu.ollama_bytes)}, ComfyUI ${gib(gpu.comfyui_bytes)}, desktop ${gib(gpu.desktop_bytes)}` +
        `, other ${gib(gpu.other_bytes)} of ${gib(gpu.total_bytes)}`;
    }
  }

  // -- jobs, requests, catalogue ------------------------------------------------------------

  function progressCell(job) {
    const p = job.progress;
    if (!p) return job.state === "dispatched" ? "sent to the agent" : "starting";
    const wrap = document.createElement("span");
    const bar = document.createElement("progress");
    if (p.steps) {
      bar.max = p.steps;
      bar.value = p.step || 0;
    }
    const text = document.createElement("span");
    const parts = [];
    if (p.steps) parts.push(`step ${p.step || 0}/${p.steps}`);
    if (p.nodes_total) parts.push(`node ${p.nodes_done || 0}/${p.nodes_total}`);
    if (p.node) parts.push(`at ${p.node}`);
    text.textContent = ` ${parts.join(" · ")}`;
    text.className = "progress-text";
    wrap.append(bar, text);
    return wrap;
  }

  function renderJobs(state) {
    sync($("#held"), state.held, (j) => j.id, (tr, job) => {
      tr.dataset.state = job.state;
      setCells(tr, [
        span(shortId(job.id), "id"), kind(job), span(gib(job.vram_bytes), "num"),
        span(seconds(ago(job.created_at)), "num"), span(job.reason, "why"),
        actionButton(tr, "Cancel", "Cancel? click again", () => cancelJob(job.id)),
      ]);
    });
    sync($("#running"), state.running, (j) => j.id, (tr, job) => {
      tr.dataset.state = job.state;
      setCells(tr, [
        span(shortId(job.id), "id"), kind(job), job.agent || "–", span(job.state, `state-${job.state}`),
        progressCell(job), span(job.reason, "why"),
        actionButton(tr, "Cancel", "Cancel? click again", () => cancelJob(job.id)),
      ]);
    });
    sync($("#recent"), state.recent_jobs.slice(0, RECENT_ROWS), (j) => j.id, (tr, job) => {
      tr.dataset.state = job.state;
      const took = (Date.parse(job.updated_at) - Date.parse(job.created_at)) / 1000;
      setCells(tr, [
        span(shortId(job.id), "id"), kind(job), span(job.state, `state-${job.state}`),
        span(`${seconds(ago(job.updated_at))} ago`, "num"), span(seconds(took), "num"),
        span(job.error ? `${job.reason}: ${job.error}` : job.reason, "why"),
      ]);
    });
    $("#held-count").textContent = state.held.length ? `(${state.held.length})` : "";
    $("#running-count").textContent = state.running.length ? `(${state.running.length})` : "";
  }

  function renderLlm(state) {
    const key = (r) => String(r.id);
    sync($("#llm-active"), state.llm_active, key, (tr, r) => {
      const waiting = r.outcome === "waiting";
      setCells(tr, [
        r.requested, waiting ? span("waiting for room", "state-held") : r.model, r.agent || "–",
        span(seconds(r.duration_s), "num"), span(r.reason, "why"),
      ]);
    });
    sync($("#llm-recent"), state.llm_recent.slice(0, RECENT_ROWS), key, (tr, r) => {
      setCells(tr, [
        r.requested, r.model || "–", span(r.outcome, r.outcome === "refused" ? "state-failed" : ""),
        span(seconds(r.duration_s), "num"), span(r.reason, "why"),
      ]);
    });
    $("#llm-count").textContent = state.llm_active.length ? `(${state.llm_active.length})` : "";
  }

  function renderCatalogue(catalogue) {
    const fixed = (v, digits) => (v ? v.toFixed(digits) : "–");
    sync($("#models"), catalogue.models, (m) => m.name, (tr, m) => {
      setCells(tr, [
        m.name + (m.fits ? "" : " (does not fit)"), span(m.quality.toFixed(0), "num"),
        span(gib(m.vram_bytes), "num"), span(gib(m.size_bytes), "num"),
        span(fixed(m.decode_tokens_per_s, 1), "num"), span(fixed(m.prompt_tokens_per_s, 0), "num"),
        span(m.load_s ? seconds(m.load_s) : "–", "num"),
        span(m.measured ? m.samples : "guessed", "num"), m.resident_on.join(", ") || "–",
      ]);
    });
    const footprints = Object.entries(catalogue.image_footprints_bytes).map(([key, bytes]) => {
      const [family, size] = key.split(":");
      return { key, family, size: size || "", bytes };
    });
    sync($("#footprints"), footprints, (f) => f.key, (tr, f) => {
      setCells(tr, [f.family, f.size, span(gib(f.bytes), "num")]);
    });
  }

  function render(state) {
    lastState = state;
    nowSkewMs = Date.parse(state.now) - Date.now();
    $("#clock").textContent = new Date(state.now).toLocaleTimeString();
    const counts = Object.entries(state.jobs_by_state).map(([s, n]) => `${n} ${s}`).join(", ");
    $("#counts").textContent = counts ? `image jobs: ${counts}` : "";
    addHistory(state.history, state.history_reset);
    renderAgents(state.agents);
    renderJobs(state);
    renderLlm(state);
    renderCatalogue(state.catalogue);
    drawCharts();
  }

  // -- the feed -----------------------------------------------------------------------------

  function setLive(text, cls) {
    const badge = $("#live");
    badge.textContent = text;
    badge.className = `badge ${cls}`;
  }

  function follow() {
    const feed = new EventSource("events");
    feed.addEventListener("open", () => setLive("live", "ok"));
    feed.addEventListener("state", (event) => render(JSON.parse(event.data)));
    feed.addEventListener("error", async () => {
      setLive("reconnecting…", "wait");
      if (feed.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      // Closed for good: the session may have ended; the login page says so.
      const check = await fetch("api/state", { credentials: "same-origin" }).catch(() => null);
      if (check && check.status === 401) location.assign("login");
      else setTimeout(follow, 3000);
    });
  }

  // Waits and expiries count on between messages.
  setInterval(() => { if (lastState) { renderAgents(lastState.agents); renderJobs(lastState); } }, 1000);
  window.gpuDashboard = { gpus, state: () => lastState };
  follow();
})();
