// The EdgeFleet dashboard: plain JS over the /api/v1 routes; every text goes in via textContent.
"use strict";
(function () {
  const KEY = "edgefleet.token";
  let me = null;
  let timer = null;
  let skew = 0; // s: the server's clock minus ours (from each answer's Date header)

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "onclick") e.addEventListener("click", v);
      else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  async function api(path, options) {
    const token = sessionStorage.getItem(KEY) || "";
    // "no-cache": the browser keeps a body with its ETag and asks again with If-None-Match;
    // an unchanged view comes back as 304 and is read from its cache.
    const r = await fetch(path, Object.assign({ cache: "no-cache" }, options, {
      headers: Object.assign({ Authorization: "Bearer " + token, "Content-Type": "application/json" },
        (options || {}).headers || {}),
    }));
    const date = Date.parse(r.headers.get("Date") || "");
    if (!isNaN(date)) skew = (date - Date.now()) / 1000;
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
    return body;
  }

  function ago(s) {
    if (s === null || s === undefined) return "never";
    if (s < 90) return s + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  function table(headers, rows) {
    return h("table", {}, h("thead", {}, h("tr", {}, headers.map(t => h("th", {}, t)))),
      h("tbody", {}, rows.map(r => h("tr", {}, r.map(c => h("td", {}, c))))));
  }

  function card(label, value, cls) {
    return h("div", { class: "card" }, h("b", { class: cls || null }, value), label);
  }

  // -- pages -------------------------------------------------------------------------------------
  async function fleet(page) {
    const { as_of, devices } = await api("/api/v1/devices");
    // last_seen_s counts to as_of (the body is the same while the fleet is): add the time since
    const since = Math.max(0, Math.round(Date.now() / 1000 + skew - as_of));
    for (const d of devices) if (d.last_seen_s !== null) d.last_seen_s += since;
    const online = devices.filter(d => d.last_seen_s !== null && d.last_seen_s < 120).length;
    const synced = devices.filter(d => d.in_sync).length;
    const failing = devices.filter(d => d.last_result && d.last_result !== "ok").length;
    page.replaceChildren(
      h("h2", {}, "Fleet"),
      h("div", { class: "cards" }, card("devices", devices.length), card("online", online, "ok"),
        card("offline", devices.length - online, devices.length - online ? "warn" : null),
        card("in sync", synced), card("last install failed", failing, failing ? "bad" : null)),
      table(["device", "groups", "state", "runs", "desired", "last seen", "last result"],
        devices.map(d => [
          d.device, d.groups.join(", "), d.revoked ? "revoked" : d.state,
          d.version ? `${d.model} ${d.version} (#${d.sequence})` : "—",
          d.desired_sequence ? h("span", { class: d.in_sync ? "ok" : "warn" }, `${d.desired_version} (#${d.desired_sequence})`) : "—",
          h("span", { class: d.last_seen_s !== null && d.last_seen_s < 120 ? "ok" : "warn" }, ago(d.last_seen_s)),
          h("span", { class: d.last_result && d.last_result !== "ok" ? "bad" : null }, d.last_result || "—"),
        ])));
  }

  async function versions(page) {
    const { models } = await api("/api/v1/models");
    const acc = m => (m.metrics && typeof m.metrics.accuracy === "number") ? m.metrics.accuracy.toFixed(4) : "—";
    page.replaceChildren(h("h2", {}, "Versions and lineage"),
      table(["model", "version", "format", "parent", "FL run / round", "accuracy"],
        models.map(m => [m.name, m.version, m.format, m.parent || "—",
          m.fl_run ? `${m.fl_run} / ${m.fl_round}` : "—", acc(m)])));
  }

  async function flRuns(page) {
    const { runs } = await api("/api/v1/fl/runs");
    const parts = [h("h2", {}, "Federated runs")];
    if (!runs.length) parts.push(h("p", { class: "hint" }, "No FL run yet (edgefleet fl start …)."));
    for (const run of runs) {
      parts.push(h("h3", {}, `${run.run_id} — ${run.name}`));
      parts.push(EF.lineChart([{ name: "accuracy", points: run.rounds.map(r => [r.round, r.accuracy]) }],
        { xLabel: "round", yLabel: "accuracy", yMin: 0, yMax: 1 }));
      const eps = run.rounds.filter(r => typeof r.epsilon === "number");
      if (eps.length) {
        parts.push(EF.lineChart([{ name: "accuracy vs ε", points: eps.map(r => [r.epsilon, r.accuracy]) }],
          { xLabel: "ε", yLabel: "accuracy", yMin: 0, yMax: 1 }));
      }
      parts.push(h("p", { class: "chain" }, run.rounds.map(r => `r${r.round}: ${r.version}`).join(" → ")));
    }
    page.replaceChildren(...parts);
  }

  async function rollouts(page) {
    const { rollouts } = await api("/api/v1/rollouts");
    const parts = [h("h2", {}, "Rollouts")];
    if (!rollouts.length) parts.push(h("p", { class: "hint" }, "No rollout yet (edgefleet rollout start …)."));
    for (const r of rollouts.slice().reverse()) {
      const stages = [r.spec.canary].concat(r.spec.waves);
      const st = r.state;
      const waves = stages.map((s, i) => {
        let cls = "wave";
        if (i < st.wave || st.phase === "done") cls += " done";
        else if (i === st.wave) cls += ["rolling_back", "rolled_back", "aborted"].includes(st.phase) ? " halted" : " current";
        return h("span", { class: cls }, (i === 0 ? "canary " : "") + s);
      });
      const buttons = [];
      const live = !["done", "aborted", "rolled_back"].includes(st.phase);
      if (me.may["rollout.pause"] && live) {
        if (st.paused) buttons.push(h("button", { "data-action": "resume", onclick: () => control(r.id, "resume") }, "Resume"));
        else buttons.push(h("button", { "data-action": "pause", onclick: () => control(r.id, "pause") }, "Pause"));
        buttons.push(h("button", { "data-action": "abort", onclick: () => control(r.id, "abort") }, "Abort"));
      }
      if (me.may["rollout.rollback"] && me.available["rollout.rollback"] && st.released.length && st.phase !== "rolled_back") {
        buttons.push(h("button", { "data-action": "rollback", onclick: () => control(r.id, "rollback") }, "Roll back"));
      }
      parts.push(h("div", { class: "rollout", "data-rollout": r.id },
        h("h3", {}, `#${r.id} ${r.spec.name} ${r.spec.version}`),
        h("div", {}, "phase ", h("b", { "data-phase": st.phase }, st.phase + (st.paused ? " (paused)" : "")),
          st.reason ? ` — ${st.reason}` : ""),
        h("div", { class: "waves" }, waves),
        h("div", { class: "hint" }, "gates: " + (r.spec.gates.join(", ") || "none") + ` · bake ${r.spec.bake} s`),
        h("div", {}, buttons),
        table(["time", "decision", "wave", "reason", "evidence"], r.decisions.slice(-20).reverse().map(d => [
          new Date(d.at * 1000).toLocaleTimeString(), d.action, d.wave, d.reason,
          h("pre", {}, JSON.stringify(d.evidence, null, 1).slice(0, 1500))]))));
    }
    page.replaceChildren(...parts);
  }

  async function control(id, what) {
    try {
      await api(`/api/v1/rollouts/${id}/${what}`, { method: "POST" });
      status(`rollout ${id}: ${what} done`);
    } catch (e) { status(`rollout ${id}: ${e.message}`, true); }
    show();
  }

  async function telemetry(page) {
    const t = await api("/api/v1/telemetry?window=3600");
    const parts = [h("h2", {}, "Latency and errors per version (last hour)")];
    const keys = Object.keys(t.versions);
    if (!keys.length) parts.push(h("p", { class: "hint" }, "No inference telemetry in the last hour."));
    const mins = s => (s.time - t.since) / 60;
    for (const key of keys) {
      const s = t.versions[key];
      parts.push(h("h3", {}, key), EF.lineChart([
        { name: "p50 ms", points: s.map(p => [mins(p), p.p50_ms ?? NaN]) },
        { name: "p95 ms", points: s.map(p => [mins(p), p.p95_ms ?? NaN]) },
        { name: "p99 ms", points: s.map(p => [mins(p), p.p99_ms ?? NaN]) },
      ], { xLabel: "minutes into the hour", yLabel: "ms" }), " ", EF.lineChart([
        { name: "error rate", points: s.map(p => [mins(p), p.error_rate]) },
      ], { xLabel: "minutes into the hour", yLabel: "errors / call", yMin: 0, width: 360 }));
    }
    parts.push(h("h3", {}, "Lifetime totals"), table(["version", "calls", "errors", "devices"],
      Object.entries(t.totals).map(([k, v]) => [k, v.count, v.errors, v.devices])));
    page.replaceChildren(...parts);
  }

  async function drift(page) {
    const d = await api("/api/v1/drift?window=3600");
    const parts = [h("h2", {}, "Drift (PSI against the training data, last hour)")];
    for (const [key, feats] of Object.entries(d.features)) {
      parts.push(h("h3", {}, `${key}: highest PSI per feature`),
        EF.barChart(feats.map(([i, psi]) => [i, psi]), { xLabel: "feature", yLabel: "PSI", mark: 0.2 }));
    }
    parts.push(table(["scope", "key", "devices", "drifting", "max", "median"], d.aggregates.map(a => [
      a.scope, a.key, a.devices, h("span", { class: a.drifting ? "bad" : "ok" }, a.drifting),
      a.max_score.toFixed(3), a.median_score.toFixed(3)])));
    parts.push(h("h3", {}, "Alerts"), table(["time", "device", "version", "score", "state", "run"],
      d.alerts.slice().reverse().map(a => [new Date(a.created * 1000).toLocaleString(), a.device,
        `${a.name}@${a.version}`, a.score.toFixed(3), a.state, a.run_id || "—"])));
    page.replaceChildren(...parts);
  }

  async function audit(page) {
    const { entries } = await api("/api/v1/audit?limit=200");
    page.replaceChildren(h("h2", {}, "Audit log"),
      table(["time", "who", "from", "action", "target", "result"], entries.map(e => [
        new Date(e.time * 1000).toLocaleString(), `${e.actor} (${e.role})`, e.source, e.action, e.target,
        h("span", { class: e.result === "ok" ? "ok" : "bad" }, e.result)])));
  }

  const PAGES = { fleet, versions, fl: flRuns, rollouts, telemetry, drift, audit };

  function status(text, bad) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.className = bad ? "error" : "hint";
  }

  async function show() {
    const tab = (location.hash || "#fleet").slice(1);
    const name = PAGES[tab] ? tab : "fleet";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === name);
    for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== name;
    try {
      await PAGES[name](document.getElementById(name));
      status("updated " + new Date().toLocaleTimeString());
    } catch (e) {
      status(e.message, true);
    }
  }

  async function login(token) {
    sessionStorage.setItem(KEY, token);
    try {
      me = await api("/api/v1/me");
    } catch (e) {
      sessionStorage.removeItem(KEY);
      document.getElementById("login-error").textContent = e.message;
      return;
    }
    document.getElementById("login").hidden = true;
    document.getElementById("tabs").hidden = false;
    for (const a of document.querySelectorAll("nav a[data-needs]")) a.hidden = !me.may[a.dataset.needs];
    document.getElementById("who").textContent = `${me.name} (${me.role})`;
    await show();
    clearInterval(timer);
    timer = setInterval(show, 5000);
  }

  window.addEventListener("hashchange", () => { if (me) show(); });
  document.getElementById("login-form").addEventListener("submit", ev => {
    ev.preventDefault();
    login(document.getElementById("token").value.trim());
  });
  const saved = sessionStorage.getItem(KEY);
  if (saved) login(saved);
})();
