// Ferry dashboard: reads the run's document from /dashboard/v1/run whenever the live feed
// says it changed, and draws the pages. Text from the run (node names, failure reasons,
// metric names) only ever goes in through textContent.
"use strict";
(function () {
  const charts = window.FerryCharts;
  const $ = (id) => document.getElementById(id);
  const state = {
    view: null,
    run: new URLSearchParams(location.search).get("run"),
    sort: { key: "name", asc: true },
    compareOff: new Set(),
    loadedAt: null,
  };

  // ---- access ----------------------------------------------------------------------------
  const viewerToken = () => sessionStorage.getItem("ferry-viewer");
  const adminToken = () => sessionStorage.getItem("ferry-admin");
  function headers(token) {
    const h = {};
    const t = token || viewerToken() || adminToken();
    if (t) h.Authorization = "Bearer " + t;
    return h;
  }
  async function getJson(path) {
    const res = await fetch(path, { headers: headers(), cache: "no-store" });
    if (res.status === 401) { showLogin((await res.json()).error); return null; }
    if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error || res.statusText);
    return res.json();
  }
  async function act(method, path, body) {
    const res = await fetch(path, {
      method: method,
      headers: Object.assign({ "Content-Type": "application/json" }, headers(adminToken())),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    const answer = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(answer.error || res.statusText);
    return answer;
  }
  function showLogin(message) {
    $("login").hidden = false;
    $("login-error").textContent = viewerToken() ? message || "" : "";
  }
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("ferry-viewer", $("login-token").value.trim());
    $("login").hidden = true;
    refresh();
  });

  // ---- helpers ---------------------------------------------------------------------------
  function text(tag, value, cls) {
    const node = document.createElement(tag);
    node.textContent = value === undefined || value === null ? "" : String(value);
    if (cls) node.className = cls;
    return node;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : text("td", c));
    return tr;
  }
  function fill(tbody, rows) {
    const frag = document.createDocumentFragment();
    rows.forEach((r) => frag.appendChild(r));
    tbody.replaceChildren(frag);
  }
  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "kB", "MB", "GB", "TB"];
    const k = Math.min(units.length - 1, Math.floor(Math.log10(n) / 3));
    return (n / Math.pow(1000, k)).toFixed(k ? 1 : 0) + " " + units[k];
  }
  const pct = (x) => (x === null || x === undefined || Number.isNaN(x) ? "-" : (100 * x).toFixed(1) + "%");
  function find(obj, key) {
    if (!obj || typeof obj !== "object") return undefined;
    if (Object.prototype.hasOwnProperty.call(obj, key)) return obj[key];
    for (const v of Object.values(obj)) {
      const found = find(v, key);
      if (found !== undefined) return found;
    }
    return undefined;
  }
  function flatten(obj, prefix, out) {
    for (const [k, v] of Object.entries(obj || {})) {
      const name = prefix ? prefix + "." + k : k;
      if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, name, out);
      else if (v !== null && v !== undefined) out.push([name, Array.isArray(v) ? JSON.stringify(v) : String(v)]);
    }
    return out;
  }
  const rounds = () => (state.view && state.view.history && state.view.history.rounds) || [];
  const series = (pick) => rounds().filter((r) => typeof pick(r) === "number").map((r) => [r.round, pick(r)]);

  // ---- loading ---------------------------------------------------------------------------
  let loading = false, again = false;
  async function refresh() {
    if (loading) { again = true; return; }
    loading = true;
    try {
      do {
        again = false;
        const q = state.run ? "?run=" + encodeURIComponent(state.run) : "";
        const view = await getJson("/dashboard/v1/run" + q);
        if (view) { state.view = view; state.loadedAt = Date.now(); render(); }
      } while (again);
    } catch (e) {
      $("phase").textContent = "error: " + e.message;
      $("phase").className = "pill bad";
    } finally {
      loading = false;
    }
  }

  async function listen() {
    for (;;) {
      try {
        const res = await fetch("/dashboard/v1/events", { headers: headers(), cache: "no-store" });
        if (res.status === 401) { showLogin((await res.json()).error); await sleep(2000); continue; }
        if (!res.ok || !res.body) throw new Error(res.statusText);
        setFeed("live", "live");
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            if (/^event: changed/m.test(block)) refresh();
          }
        }
      } catch (e) {
        /* the server went away or restarted: try again */
      }
      setFeed("reconnecting", "muted");
      await sleep(1500);
    }
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  function setFeed(label, cls) {
    $("feed-state").textContent = label;
    $("feed-state").className = "pill " + cls;
  }

  // ---- pages -----------------------------------------------------------------------------
  function currentPage() {
    const page = (location.hash || "#overview").slice(1);
    return document.getElementById("page-" + page) ? page : "overview";
  }
  function showPage() {
    const page = currentPage();
    for (const section of document.querySelectorAll("section.page")) section.hidden = section.id !== "page-" + page;
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.page === page);
    render();
  }
  window.addEventListener("hashchange", showPage);

  function render() {
    const view = state.view;
    if (!view) return;
    renderHeader(view);
    const page = currentPage();
    if (page === "overview") renderOverview(view);
    if (page === "classes") renderClasses();
    if (page === "nodes") renderNodes(view);
    if (page === "sites") renderSites(view);
    if (page === "safety") renderSafety(view);
    if (page === "compare") renderCompare();
    if (page === "operate") renderOperate(view);
  }

  function renderHeader(view) {
    const live = view.live || {};
    const last = rounds().length ? rounds()[rounds().length - 1].round : 0;
    $("run-title").textContent = view.title + " (" + view.kind + ")";
    const finished = live.finished || (view.history && view.history.final ? "finished" : null);
    $("phase").textContent = view.kind === "finished" ? "finished run" : finished ? "finished: " + finished : String(live.phase || "").replace(/_/g, " ");
    $("phase").className = "pill" + (finished && /fail|error/.test(finished) ? " bad" : "");
    $("round-counter").textContent = String(last);
    $("rounds-total").textContent = String(live.rounds || find(view.history.config, "rounds") || "-");
    const uses = safetyUses(view);
    $("tab-safety").hidden = !(uses.dp || uses.robust || uses.secagg);
    $("tab-compare").hidden = view.runs.length < 2;
    $("tab-sites").hidden = !crossSite(view);
    $("tab-operate").hidden = !view.actions;
    const picker = $("run-picker");
    picker.hidden = view.runs.length < 2;
    if (!picker.hidden && picker.options.length !== view.runs.length) {
      picker.replaceChildren(...view.runs.map((name) => { const o = text("option", name); o.value = name; return o; }));
    }
    if (!picker.hidden) picker.value = view.title;
  }
  $("run-picker").addEventListener("change", (e) => {
    state.run = e.target.value;
    history.replaceState(null, "", "?run=" + encodeURIComponent(state.run) + location.hash);
    refresh();
  });

  function card(label, value) {
    const div = text("div", "", "card");
    div.appendChild(text("div", label, "label"));
    div.appendChild(text("div", value, "value"));
    return div;
  }

  function renderOverview(view) {
    const live = view.live || {};
    const rs = rounds();
    const last = rs[rs.length - 1];
    const acc = rs.map((r) => (typeof r.accuracy === "number" ? r.accuracy : r.federated && r.federated.accuracy)).filter((a) => typeof a === "number");
    const totalUp = rs.reduce((s, r) => s + (r.bytes_up || 0), 0);
    const totalDown = rs.reduce((s, r) => s + (r.bytes_down || 0), 0);
    const cards = [
      card("strategy", find(view.history.config, "strategy") || "-"),
      card("latest accuracy", pct(acc[acc.length - 1])),
      card("best accuracy", acc.length ? pct(Math.max(...acc)) : "-"),
      card("participants (last round)", last ? last.participants : "-"),
    ];
    if (live.nodes_online !== undefined) cards.push(card("nodes online", live.nodes_online));
    if (live.phase === "training" || live.phase === "evaluating") cards.push(card(live.phase === "training" ? "updates in" : "evaluations in", `${live.updates_in} of ${live.cohort}`));
    cards.push(card("moved up / down", bytes(totalUp) + " / " + bytes(totalDown)));
    if (last && typeof last.epsilon === "number") cards.push(card("epsilon spent", last.epsilon.toFixed(3)));
    if (last && typeof last.sim_time_s === "number") cards.push(card("simulated time", (last.sim_time_s / 60).toFixed(1) + " min"));
    if (last && last.staleness) cards.push(card("staleness (last version)", `mean ${last.staleness.mean.toFixed(1)}, max ${last.staleness.max}`));
    $("summary").replaceChildren(...cards);
    $("waiting").hidden = !live.waiting;
    $("waiting").textContent = live.waiting || "";
    charts.line($("accuracy-chart"), [
      { name: "central", points: series((r) => r.accuracy) },
      { name: "federated", points: series((r) => r.federated && r.federated.accuracy) },
    ].filter((s) => s.points.length), { yMin: 0, yMax: 1 });
    if (!performance.getEntriesByName("ferry-first-chart").length && Number($("accuracy-chart").dataset.points) > 0) {
      performance.mark("ferry-first-chart");
    }
    charts.line($("loss-chart"), [
      { name: "central test loss", points: series((r) => r.loss) },
      { name: "federated loss", points: series((r) => r.federated && r.federated.loss) },
      { name: "training loss", points: series((r) => r.train_loss) },
    ].filter((s) => s.points.length));
    charts.line($("bytes-chart"), [
      { name: "up", points: series((r) => r.bytes_up / 1e6) },
      { name: "down", points: series((r) => r.bytes_down / 1e6) },
    ], { yMin: 0 });
    charts.line($("time-chart"), [
      { name: "wall time", points: series((r) => r.wall_s) },
      { name: "mean staleness (versions)", points: series((r) => r.staleness && r.staleness.mean) },
    ].filter((s) => s.points.length), { yMin: 0 });
    const failed = (view.history.failed_rounds || []).map((f) =>
      row([String(f.round), String(f.attempt), text("td", f.reason, "reason")]));
    fill($("failed-rounds").tBodies[0], failed);
    $("failed-rounds").hidden = $("failed-title").hidden = failed.length === 0;
    fill($("settings").tBodies[0], flatten(view.history.config, "", []).map(([k, v]) => row([k, v])));
  }

  function renderClasses() {
    const rs = rounds().filter((r) => Array.isArray(r.class_accuracy) && r.class_accuracy.length);
    const classes = rs.reduce((n, r) => Math.max(n, r.class_accuracy.length), 0);
    const rows = Array.from({ length: classes }, (_, c) => "class " + c);
    const values = rows.map((_, c) => rs.map((r) => r.class_accuracy[c]));
    charts.heatmap($("class-heatmap"), rows, rs.map((r) => r.round), values);
  }

  // The cross-site matrix: one row per model, one column per site.
  function crossSite(view) {
    const f = view.history && view.history.final;
    return f && f.cross_site ? f.cross_site : null;
  }
  function renderSites(view) {
    const m = crossSite(view);
    const rows = m ? m.rows.map((r) => r.model) : [];
    const sites = m ? m.sites : [];
    charts.heatmap($("sites-heatmap"), rows, sites, m ? m.rows.map((r) => r.accuracy) : [], {
      cell: (r, c, v) => `${r} on site ${c}: ${v === null || v === undefined ? "not scored" : charts.fmt(v)}`,
      empty: "this run has no cross-site matrix (run it with --cross-site)",
    });
    $("sites-examples").textContent = m
      ? "held-out examples per site: " + sites.map((s, i) => s + " " + m.examples[i]).join(", ")
      : "";
  }

  // One line per node: its enrolment and connectivity joined with what the rounds record.
  function nodeStats(view) {
    const stats = new Map();
    const get = (id) => {
      if (!stats.has(id)) stats.set(id, { id: id, name: id, online: null, seen: null, revoked: false, rounds: 0, failures: [], up: 0, down: 0, fed: null, excluded: 0 });
      return stats.get(id);
    };
    for (const n of view.nodes) Object.assign(get(n.id), { name: n.name, online: n.online, seen: n.last_seen_s, revoked: n.revoked, relay: !!n.relay, via: n.via || null });
    for (const r of rounds()) {
      const contributors = r.contributors || [], failed = r.failed || [];
      const cohort = contributors.length + failed.length;
      const up = r.participants ? r.bytes_up / r.participants : 0;
      const down = cohort ? r.bytes_down / cohort : 0;
      for (const id of contributors) { const s = get(id); s.rounds += 1; s.up += up; s.down += down; }
      for (const f of failed) { const s = get(f.node); s.failures.push("round " + r.round + ": " + f.reason); s.down += down; }
      for (const id of r.excluded || []) get(id).excluded += 1;
      const byNode = r.federated && r.federated.node_accuracy;
      for (const [id, a] of Object.entries(byNode || {})) get(id).fed = a;
    }
    return [...stats.values()];
  }

  function statusOf(s) {
    if (s.revoked) return "revoked";
    if (s.online === true) return "online";
    if (s.online === false) return "offline";
    return "-";
  }

  const sorters = {
    name: (s) => s.name.toLowerCase(), status: statusOf, seen: (s) => (s.seen === null ? Infinity : s.seen),
    rounds: (s) => s.rounds, failures: (s) => s.failures.length, reason: (s) => s.failures[s.failures.length - 1] || "",
    up: (s) => s.up, down: (s) => s.down, fed: (s) => (s.fed === null ? -1 : s.fed),
  };

  function renderNodes(view) {
    const all = nodeStats(view);
    const filter = $("node-filter").value.trim().toLowerCase();
    const shown = filter ? all.filter((s) => s.name.toLowerCase().includes(filter) || s.id.toLowerCase().includes(filter)) : all;
    const key = sorters[state.sort.key] || sorters.name;
    shown.sort((a, b) => { const x = key(a), y = key(b); const c = x < y ? -1 : x > y ? 1 : 0; return state.sort.asc ? c : -c; });
    const relays = all.filter((s) => s.relay).length;
    const online = all.filter((s) => s.online === true && !s.relay).length;
    $("nodes-summary").textContent = `${all.length - relays} nodes` + (all.some((s) => s.online !== null) ? `, ${online} online` : "") + (relays ? `, ${relays} relays` : "") + (filter ? `, ${shown.length} match` : "");
    const names = new Map(all.map((s) => [s.id, s.name]));
    for (const th of $("nodes-table").tHead.rows[0].cells) {
      th.classList.toggle("sorted", th.dataset.key === state.sort.key);
      th.classList.toggle("asc", th.dataset.key === state.sort.key && state.sort.asc);
    }
    fill($("nodes-table").tBodies[0], shown.map((s) => {
      const tr = row([
        text("td", s.relay ? s.name + " (relay)" : s.via ? s.name + " via " + (names.get(s.via) || s.via) : s.name, "name"),
        text("td", statusOf(s), "status " + statusOf(s)),
        text("td", s.seen === null ? "-" : s.seen.toFixed(1) + " s ago", "num"),
        text("td", s.rounds + (s.excluded ? ` (${s.excluded} left out)` : ""), "num"),
        text("td", s.failures.length, "num"),
        text("td", s.failures[s.failures.length - 1] || "", "reason"),
        text("td", bytes(s.up), "num"),
        text("td", bytes(s.down), "num"),
        text("td", pct(s.fed), "num"),
      ]);
      tr.dataset.node = s.id;
      if (s.failures.length) tr.title = s.failures.join("\n");
      return tr;
    }));
  }
  $("nodes-table").tHead.addEventListener("click", (e) => {
    const key = e.target.dataset && e.target.dataset.key;
    if (!key) return;
    state.sort = { key: key, asc: state.sort.key === key ? !state.sort.asc : true };
    render();
  });
  $("node-filter").addEventListener("input", () => render());

  function safetyUses(view) {
    const rs = (view.history && view.history.rounds) || [];
    const config = view.history && view.history.config;
    return {
      dp: rs.some((r) => r.dp) || !!find(config, "dp"),
      robust: rs.some((r) => (r.excluded || []).length) || !!find(config, "aggregator") || !!find(config, "norm_bound"),
      secagg: !!find(config, "secagg"),
    };
  }

  function renderSafety(view) {
    const uses = safetyUses(view);
    const rs = rounds();
    $("privacy-panel").hidden = !uses.dp;
    if (uses.dp) {
      const budget = find(view.history.config, "epsilon_budget");
      const last = rs.filter((r) => r.dp).pop();
      $("privacy-summary").textContent = last
        ? `epsilon ${last.dp.epsilon.toFixed(3)} spent at delta ${last.dp.delta}` + (typeof budget === "number" ? ` of a budget of ${budget}` : " (no budget set)")
        : "no private round committed yet";
      charts.line($("epsilon-chart"), [{ name: "epsilon", points: series((r) => r.dp && r.dp.epsilon) }],
        Object.assign({ yMin: 0 }, typeof budget === "number" ? { limit: { y: budget, name: "budget " + budget } } : {}));
      charts.line($("clip-chart"), [{ name: "clip norm", points: series((r) => r.dp && r.dp.clip_norm) }], { yMin: 0 });
    }
    $("robust-panel").hidden = !uses.robust;
    if (uses.robust) {
      const rule = find(view.history.config, "aggregator");
      $("robust-summary").textContent = "rule: " + (rule ? JSON.stringify(rule) : "weighted mean") + (find(view.history.config, "norm_bound") ? ", norm bound " + find(view.history.config, "norm_bound") : "");
      const names = new Map(view.nodes.map((n) => [n.id, n.name]));
      fill($("excluded-table").tBodies[0], rs.filter((r) => (r.excluded || []).length).map((r) =>
        row([String(r.round), r.excluded.map((id) => names.get(id) || id).join(", ")])));
    }
    $("secagg-panel").hidden = !uses.secagg;
    if (uses.secagg) {
      const live = view.live || {};
      $("secagg-stage").textContent = live.secagg_stage ? "current stage: " + live.secagg_stage : "no secure round open";
      fill($("secagg-table").tBodies[0], rs.map((r) =>
        row([String(r.round), String(r.participants), String(r.failures), r.aborted ? "aborted: " + r.aborted : "unmasked"])));
    }
  }

  async function renderCompare() {
    const curves = await getJson("/dashboard/v1/compare");
    if (!curves) return;
    const picks = $("compare-picks");
    if (picks.childElementCount !== curves.length) {
      picks.replaceChildren(...curves.map((c) => {
        const label = document.createElement("label");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.checked = !state.compareOff.has(c.name);
        box.addEventListener("change", () => { box.checked ? state.compareOff.delete(c.name) : state.compareOff.add(c.name); renderCompare(); });
        label.appendChild(box);
        label.appendChild(document.createTextNode(" " + c.name));
        return label;
      }));
    }
    charts.line($("compare-chart"), curves.filter((c) => !state.compareOff.has(c.name)).map((c) => ({ name: c.name, points: c.points })), { yMin: 0, yMax: 1 });
  }

  // ---- operator --------------------------------------------------------------------------
  let tokensShownAt = 0;
  async function renderOperate(view) {
    if (!view.actions) return;
    $("admin-token").placeholder = adminToken() ? "(token set)" : "paste the admin token";
    if (!adminToken() || Date.now() - tokensShownAt < 2000) return;
    tokensShownAt = Date.now();
    try {
      const tokens = await act("GET", "/dashboard/v1/tokens");
      fill($("tokens-table").tBodies[0], tokens.map((t) => {
        const revoke = text("button", "revoke");
        revoke.disabled = t.revoked;
        revoke.addEventListener("click", () => operate(() => act("POST", "/dashboard/v1/tokens/revoke", { name: t.name }), "revoked " + t.name));
        const cell = document.createElement("td");
        cell.appendChild(revoke);
        return row([t.name, t.revoked ? "revoked" : t.used ? "used by a node" : "unused", cell]);
      }));
    } catch (e) {
      $("operate-message").textContent = e.message;
    }
  }
  async function operate(action, done) {
    try {
      const answer = await action();
      $("operate-message").textContent = typeof done === "function" ? done(answer) : done;
      tokensShownAt = 0;
      render();
    } catch (e) {
      $("operate-message").textContent = e.message;
    }
  }
  $("admin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("ferry-admin", $("admin-token").value.trim());
    $("admin-token").value = "";
    tokensShownAt = 0;
    render();
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("token-name").value.trim();
    operate(() => act("POST", "/dashboard/v1/tokens", { name: name }), (answer) => {
      $("new-token").textContent = answer.token;
      return "created a token for " + answer.name + ": give it to that node once";
    });
  });
  let stopArmed = 0;
  $("stop-run").addEventListener("click", () => {
    if (Date.now() - stopArmed > 5000) {
      stopArmed = Date.now();
      $("operate-message").textContent = "click again within 5 s to stop the run after the current round";
      return;
    }
    stopArmed = 0;
    operate(() => act("POST", "/dashboard/v1/stop"), "the run stops once the current round has committed");
  });

  showPage();
  refresh();
  listen();
})();
