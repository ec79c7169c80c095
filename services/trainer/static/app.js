// The run page of the trainer's control API: log in with the API token, follow a run's
// metrics (GET /v1/runs/{id}/metrics) and steer it (POST /v1/runs/{id}/pause|resume|...).
// The token lives in this closure only: never in a URL, web storage or a cookie.
(() => {
  "use strict";

  const POLL_MS = 2000;
  const COLORS = ["#2563eb", "#dc6803", "#12b76a", "#9e77ed", "#e31b54", "#0ba5ec", "#667085"];
  const CHARTS = [
    { id: "reward", title: "Reward", keys: ["reward/mean"] },
    {
      id: "length",
      title: "Response length (tokens)",
      keys: ["reward/response_length_mean", "reward/response_length_max"],
    },
    { id: "entropy", title: "Token entropy (nats)", keys: ["entropy/mean"] },
    {
      id: "h_hat",
      title: "h_hat distribution (band: p10 to p90)",
      keys: ["entropy/h_hat_p10", "entropy/h_hat_p50", "entropy/h_hat_p90", "entropy/h_hat_mean"],
      band: ["entropy/h_hat_p10", "entropy/h_hat_p90"],
    },
    {
      id: "clipfrac",
      title: "Clip fraction by entropy sign",
      keys: ["loss/clipfrac_high_entropy", "loss/clipfrac_low_entropy"],
    },
    { id: "rollout_corr_weight", title: "Rollout correction weight", prefix: "rollout_corr/weight" },
    {
      id: "rollout_corr",
      title: "Rollout correction: fractions and mismatch",
      prefix: "rollout_corr/",
      exclude: ["rollout_corr/weight"],
    },
    { id: "staleness", title: "Staleness (policy versions)", keys: ["staleness/mean", "staleness/max"] },
    {
      id: "staleness_samples",
      title: "Samples by staleness, dropped",
      prefix: "staleness/",
      exclude: ["staleness/mean", "staleness/max"],
    },
    { id: "tokens", title: "Learner throughput (tokens/s)", keys: ["perf/tokens_per_s"] },
  ];

  let token = null;
  let session = 0; // bumped at every log in and out: a stale poll does nothing
  let runs = [];
  let selected = null;
  let lines = [];
  let lastStep = 0;
  let timer = null;

  const $ = (id) => document.getElementById(id);

  class Unauthorized extends Error {}

  async function api(method, path) {
    const response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) throw new Unauthorized("the token was refused");
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : `HTTP ${response.status}`;
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return body;
  }

  // ---- logging in and out ----

  async function logIn(event) {
    event.preventDefault();
    const input = $("token");
    token = input.value;
    input.value = "";
    $("login-error").textContent = "";
    const mine = ++session;
    try {
      runs = await api("GET", "v1/runs");
    } catch (error) {
      if (mine !== session) return;
      token = null;
      $("login-error").textContent =
        error instanceof Unauthorized ? "Wrong token: the trainer refused it." : `Cannot reach the trainer: ${error.message}`;
      return;
    }
    if (mine !== session) return;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    $("connection").textContent = `connected to ${location.host}`;
    renderRuns();
    refresh(mine);
  }

  function logOut(reason) {
    session++;
    token = null;
    clearTimeout(timer);
    runs = [];
    selectRun(null);
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("connection").textContent = "";
    $("login-error").textContent = reason || "";
    $("token").focus();
  }

  // ---- polling ----

  async function refresh(mine) {
    if (mine !== session) return;
    try {
      runs = await api("GET", "v1/runs");
      if (mine !== session) return;
      if (selected === null && runs.length) {
        const live = runs.filter((run) => !["stopped", "finished", "failed"].includes(run.state));
        selectRun((live.length ? live[live.length - 1] : runs[runs.length - 1]).run_id);
      }
      renderRuns();
      if (selected !== null) {
        const run = selected;
        const page = await api("GET", `v1/runs/${encodeURIComponent(run)}/metrics?since=${lastStep}`);
        if (mine !== session || run !== selected) return;
        if (page.lines.length) {
          lines = lines.concat(page.lines);
          lastStep = page.last_step;
          drawCharts();
        }
      }
      $("connection").textContent = `connected to ${location.host}`;
    } catch (error) {
      if (mine !== session) return;
      if (error instanceof Unauthorized) {
        logOut("The trainer refused the token: log in again.");
        return;
      }
      $("connection").textContent = `trainer unreachable (${error.message}); retrying`;
    }
    clearTimeout(timer);
    timer = setTimeout(() => refresh(mine), POLL_MS);
  }

  // ---- runs and controls ----

  function selectRun(runId) {
    if (runId === selected) return;
    selected = runId;
    lines = [];
    lastStep = 0;
    $("message").textContent = "";
    renderRuns(); // shows the run's section first: charts are sized to it
    buildCharts();
  }

  function renderRuns() {
    const list = $("runs");
    list.replaceChildren();
    for (const run of [...runs].reverse()) {
      const item = document.createElement("li");
      item.dataset.runId = run.run_id;
      item.classList.toggle("selected", run.run_id === selected);
      const name = document.createElement("span");
      name.className = "run-id";
      name.textContent = run.run_id;
      const state = document.createElement("span");
      state.className = `state ${run.state}`;
      state.textContent = run.state;
      item.append(name, state);
      item.addEventListener("click", () => selectRun(run.run_id));
      list.append(item);
    }
    $("no-runs").hidden = runs.length > 0;
    const run = runs.find((candidate) => candidate.run_id === selected);
    $("run").hidden = !run;
    if (!run) return;
    $("run-title").textContent = run.run_id;
    $("run-state").textContent = run.state;
    $("run-state").className = `state ${run.state}`;
    $("run-step").textContent = `${run.step} / ${run.total_steps}`;
    $("run-policy").textContent = String(run.policy_version);
    $("run-checkpoint").textContent = run.checkpoint_step === null ? "none" : `step ${run.checkpoint_step}`;
    $("run-error").textContent = run.error || "";
    const ended = ["stopped", "finished", "failed"].includes(run.state);
    for (const button of $("controls").querySelectorAll("button")) {
      const action = button.dataset.action;
      button.disabled =
        ended ||
        (action === "pause" && run.state === "paused") ||
        (action === "resume" && run.state !== "paused") ||
        (action !== "stop" && run.state === "stopping");
    }
  }

  async function control(event) {
    const button = event.target.closest("button[data-action]");
    if (!button || selected === null) return;
    const action = button.dataset.action;
    const mine = session;
    try {
      await api("POST", `v1/runs/${encodeURIComponent(selected)}/${action}`);
      $("message").textContent = `${action} requested: it takes effect between steps`;
    } catch (error) {
      if (error instanceof Unauthorized) {
        logOut("The trainer refused the token: log in again.");
        return;
      }
      $("message").textContent = `${action} failed: ${error.message}`;
    }
    refresh(mine);
  }

  // ---- charts (plain canvas) ----

  function chartKeys(spec) {
    if (spec.keys) return spec.keys;
    const keys = new Set();
    for (const line of lines) {
      for (const key of Object.keys(line)) {
        if (key.startsWith(spec.prefix) && !(spec.exclude || []).some((ex) => key.startsWith(ex))) {
          keys.add(key);
        }
      }
    }
    return [...keys].sort();
  }

  function buildCharts() {
    const charts = $("charts");
    charts.replaceChildren();
    for (const spec of CHARTS) {
      const figure = document.createElement("figure");
      figure.dataset.chart = spec.id;
      const title = document.createElement("h3");
      title.textContent = spec.title;
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", spec.title);
      const caption = document.createElement("figcaption");
      figure.append(title, canvas, caption);
      charts.append(figure);
    }
    charts.dataset.steps = "0";
    drawCharts();
  }

  function format(value) {
    if (value === null || value === undefined) return "–";
    const magnitude = Math.abs(value);
    if (magnitude >= 1000) return value.toFixed(0);
    if (magnitude === 0) return "0";
    if (magnitude < 0.01) return value.toExponential(1);
    return String(Number(value.toPrecision(3)));
  }

  function drawCharts() {
    $("charts").dataset.steps = String(lines.length);
    for (const spec of CHARTS) {
      const figure = document.querySelector(`figure[data-chart="${spec.id}"]`);
      if (!figure) continue;
      const keys = chartKeys(spec);
      const series = keys.map((key, index) => ({
        key,
        color: COLORS[index % COLORS.length],
        points: lines
          .filter((line) => typeof line[key] === "number")
          .map((line) => [line.step, line[key]]),
      }));
      drawChart(figure.querySelector("canvas"), spec, series);
      const caption = figure.querySelector("figcaption");
      caption.replaceChildren();
      for (const { key, color, points } of series) {
        const entry = document.createElement("span");
        entry.dataset.key = key;
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = color;
        const latest = document.createElement("span");
        latest.className = "latest";
        latest.textContent = points.length ? format(points[points.length - 1][1]) : "–";
        entry.append(swatch, `${key} `, latest);
        caption.append(entry);
      }
    }
  }

  function drawChart(canvas, spec, series) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      ctx.fillStyle = "#5f6b7a";
      ctx.fillText("no steps yet", width / 2 - 30, height / 2);
      return;
    }
    const left = 52;
    const right = 10;
    const top = 8;
    const bottom = 20;
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    if (y0 === y1) {
      const pad = Math.abs(y0) * 0.1 || 1;
      [y0, y1] = [y0 - pad, y1 + pad];
    }
    const x = (step) => left + ((step - x0) / (x1 - x0)) * (width - left - right);
    const y = (value) => top + (1 - (value - y0) / (y1 - y0)) * (height - top - bottom);

    ctx.strokeStyle = "#e4e7ec";
    ctx.fillStyle = "#5f6b7a";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      let value = y0 + ((y1 - y0) * i) / 4;
      if (Math.abs(value) < (y1 - y0) / 1000) value = 0; // not -1.9e-4 for a tick at 0
      const py = Math.round(y(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(width - right, py);
      ctx.stroke();
      ctx.fillText(format(value), left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const stepTicks = Math.min(5, Math.max(1, x1 - x0));
    for (let i = 0; i <= stepTicks; i++) {
      const step = Math.round(x0 + ((x1 - x0) * i) / stepTicks);
      ctx.fillText(String(step), x(step), height - bottom + 5);
    }

    if (spec.band) {
      const [low, high] = spec.band.map((key) => series.find((s) => s.key === key));
      if (low && high && low.points.length && high.points.length) {
        ctx.fillStyle = "rgba(37, 99, 235, 0.12)";
        ctx.beginPath();
        low.points.forEach(([step, value], i) => (i ? ctx.lineTo(x(step), y(value)) : ctx.moveTo(x(step), y(value))));
        [...high.points].reverse().forEach(([step, value]) => ctx.lineTo(x(step), y(value)));
        ctx.closePath();
        ctx.fill();
      }
    }
    ctx.lineWidth = 1.6;
    for (const { color, points } of series) {
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.beginPath();
      points.forEach(([step, value], i) => (i ? ctx.lineTo(x(step), y(value)) : ctx.moveTo(x(step), y(value))));
      ctx.stroke();
      if (points.length === 1) {
        ctx.beginPath();
        ctx.arc(x(points[0][0]), y(points[0][1]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", () => logOut(""));
    $("controls").addEventListener("click", control);
    let pending = null;
    window.addEventListener("resize", () => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(drawCharts);
    });
    $("token").focus();
  });
})();
