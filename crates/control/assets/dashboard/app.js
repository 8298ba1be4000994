// Shoal's dashboard: plain JavaScript on the /v1 API, no build step. The token lives in
// sessionStorage, so it goes when the browser session does. Every view lays out its parts
// once and refreshes their contents every two seconds; text from the API is only ever set
// as text, never as HTML.
"use strict";

const TOKEN_KEY = "shoal-token";
const NAMESPACE_KEY = "shoal-namespace";
const REFRESH_MS = 2000;
const $ = (sel, root = document) => root.querySelector(sel);

let refreshTimer = null;
let logsAbort = null;
// Per app, the request counters of /v1/metrics as sampled at each refresh, for rates and p99.
const samples = new Map();

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function namespace() {
  return $("#namespace").value.trim() || "default";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

// Whether the banner shows a refresh's failure, which the next refresh that works clears
// (an action's failure stays until the next action or page).
let bannerFromRefresh = false;

function showError(message, fromRefresh = false) {
  const banner = $("#error");
  banner.textContent = message || "";
  banner.hidden = !message;
  bannerFromRefresh = fromRefresh && !!message;
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + token() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    signOut("The token was refused: sign in again.");
    throw new Error("unauthorized");
  }
  const text = await response.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    // Not JSON: Prometheus text, say.
  }
  if (!response.ok) {
    const why = data && data.error ? `${data.error.code}: ${data.error.message}` : response.status;
    throw new Error(`${method} ${path}: ${why}`);
  }
  return data;
}

// Runs an action, shows its failure (a role without the right, say) and refreshes.
async function act(what, method, path, body) {
  try {
    await api(method, path, body);
    showError("");
  } catch (e) {
    if (e.message !== "unauthorized") showError(`${what}: ${e.message}`);
  }
  route(false);
}

function fill(container, ...children) {
  container.replaceChildren(...children);
}

function table(headers, rows, attrs = {}) {
  return el(
    "table",
    attrs,
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows),
  );
}

function bar(used, total) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const span = el("span");
  span.style.width = `${(share * 100).toFixed(1)}%`;
  return el("span", { class: share >= 0.9 ? "bar full" : "bar", title: `${used} / ${total}` }, span);
}

function mib(bytes) {
  return bytes >= 1 << 30 ? `${(bytes / (1 << 30)).toFixed(1)}Gi` : `${Math.round(bytes / (1 << 20))}Mi`;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return `${s}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  return `${Math.round(s / 3600)}h`;
}

function eventsTable(events) {
  const rows = events
    .slice(-20)
    .reverse()
    .map((e) =>
      el(
        "tr",
        { "data-reason": e.reason },
        el("td", { text: ago(e.time) }),
        el("td", { class: e.type === "Warning" ? "bad" : "", text: e.reason }),
        el("td", { text: e.object }),
        el("td", { text: e.message }),
      ),
    );
  return table(["AGE", "REASON", "OBJECT", "MESSAGE"], rows, { id: "events-table" });
}

// ---- Overview: nodes with capacity bars, apps with ready/desired, recent events.

function overviewLayout(view) {
  fill(
    view,
    el("h1", { text: "Cluster" }),
    el("h2", { text: "Nodes" }),
    el("div", { id: "nodes" }),
    el("h2", { text: "Apps" }),
    el("div", { id: "apps" }),
    el("h2", { text: "Recent events" }),
    el("div", { id: "events" }),
  );
}

async function overview() {
  const ns = encodeURIComponent(namespace());
  const [nodes, apps, events] = await Promise.all([
    api("GET", "/v1/nodes").catch((e) => e),
    api("GET", `/v1/apps?namespace=${ns}`),
    api("GET", `/v1/events?namespace=${ns}&limit=50`),
  ]);
  if (nodes instanceof Error) {
    fill($("#nodes"), el("p", { class: "muted", text: `Not shown: ${nodes.message}` }));
  } else {
    const rows = nodes.map((n) =>
      el(
        "tr",
        { "data-node": n.name },
        el("td", {}, el("a", { href: `#/node/${encodeURIComponent(n.name)}`, text: n.name })),
        el("td", { class: n.state === "Ready" ? "ok" : "bad", text: n.state + (n.schedulable ? "" : ", cordoned") }),
        el("td", {}, bar(n.allocated.cpu_millis, n.capacity.cpu_millis), ` ${n.allocated.cpu_millis}m / ${n.capacity.cpu_millis}m`),
        el("td", {}, bar(n.allocated.memory_bytes, n.capacity.memory_bytes), ` ${mib(n.allocated.memory_bytes)} / ${mib(n.capacity.memory_bytes)}`),
        el("td", { text: n.replicas }),
      ),
    );
    fill($("#nodes"), table(["NAME", "STATE", "CPU", "MEMORY", "REPLICAS"], rows, { id: "nodes-table" }));
  }
  const rows = apps.map((a) =>
    el(
      "tr",
      { "data-app": a.name },
      el("td", {}, el("a", { href: `#/app/${encodeURIComponent(a.name)}`, text: a.name })),
      el("td", { text: a.kind }),
      el("td", { class: "revision", text: a.revision }),
      el("td", { class: a.ready >= a.desired ? "ready ok" : "ready bad", text: `${a.ready}/${a.desired}` }),
      el("td", { text: a.routes.join(", ") }),
    ),
  );
  fill($("#apps"), table(["NAME", "KIND", "REVISION", "READY", "ROUTES"], rows, { id: "apps-table" }));
  fill($("#events"), eventsTable(events));
}

// ---- An app: requests, rollout, replicas per node, revisions, logs, events; actions.

function appLayout(view, name) {
  const ns = () => encodeURIComponent(namespace());
  const path = (rest) => `/v1/apps/${encodeURIComponent(name)}${rest}?namespace=${ns()}`;
  const replicas = el("input", { id: "scale-replicas", type: "number", min: "0", size: "4" });
  const rollout = (action) =>
    el("button", {
      "data-action": action,
      text: action[0].toUpperCase() + action.slice(1),
      onclick: () => act(`rollout ${action}`, "POST", path(`/rollout/${action}`)),
    });
  fill(
    view,
    el("h1", {}, "App ", el("span", { id: "app-name", text: name }), " · revision ", el("span", { id: "revision" })),
    el("div", { class: "stats", id: "stats" }),
    el(
      "div",
      { class: "actions" },
      replicas,
      el("button", {
        "data-action": "scale",
        text: "Scale",
        onclick: () => {
          // An empty box is no 0.
          const n = replicas.value.trim() === "" ? NaN : Number(replicas.value);
          if (!Number.isInteger(n) || n < 0) {
            showError("scale: give a whole number of replicas, 0 or more");
            return;
          }
          act("scale", "POST", `${path("/scale")}&replicas=${n}`);
        },
      }),
      rollout("pause"),
      rollout("resume"),
      rollout("promote"),
      rollout("abort"),
      el("button", {
        "data-action": "undo",
        text: "Undo (previous revision)",
        onclick: () => act("undo", "POST", path("/rollback")),
      }),
    ),
    el("h2", { text: "Rollout" }),
    el("div", { id: "rollout" }),
    el("h2", { text: "Replicas" }),
    el("div", { id: "replicas" }),
    el("h2", { text: "Revisions" }),
    el("div", { id: "revisions" }),
    el("h2", { text: "Logs" }),
    el("pre", { id: "logs" }),
    el("h2", { text: "Events" }),
    el("div", { id: "events" }),
  );
}

// Parses the counters of `app` out of Prometheus text: requests, 5xx and the latency buckets,
// summed over revisions.
function appCounters(text, ns, app) {
  const out = { requests: 0, errors: 0, buckets: new Map() };
  const mine = `namespace="${ns}"`;
  for (const line of text.split("\n")) {
    if (!line.startsWith("shoal_http_") || !line.includes(mine) || !line.includes(`app="${app}"`)) continue;
    const value = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (line.startsWith("shoal_http_requests_total")) out.requests += value;
    else if (line.startsWith("shoal_http_server_errors_total")) out.errors += value;
    else if (line.startsWith("shoal_http_request_duration_seconds_bucket")) {
      const le = line.match(/le="([^"]+)"/)[1];
      out.buckets.set(le, (out.buckets.get(le) || 0) + value);
    }
  }
  return out;
}

// How much a counter grew over the samples, as Prometheus' increase() takes it: a drop is
// a reset (a restarted node or server), after which the counter counts from zero.
function increase(history, get) {
  let sum = 0;
  for (let i = 1; i < history.length; i++) {
    const [a, b] = [get(history[i - 1]), get(history[i])];
    sum += b >= a ? b - a : b;
  }
  return sum;
}

// Requests/s, 5xx/s and p99 over the samples kept (up to five minutes), from counter deltas.
function rates(history) {
  if (history.length < 2) return null;
  const seconds = (history[history.length - 1].t - history[0].t) / 1000;
  const requests = increase(history, (h) => h.requests);
  let p99 = null;
  if (requests > 0) {
    const bounds = [...history[history.length - 1].buckets.keys()]
      .map((le) => [le, le === "+Inf" ? Infinity : Number(le)])
      .sort((a, b) => a[1] - b[1]);
    for (const [le, bound] of bounds) {
      if (increase(history, (h) => h.buckets.get(le) || 0) >= 0.99 * requests) {
        p99 = bound;
        break;
      }
    }
  }
  return { rps: requests / seconds, eps: increase(history, (h) => h.errors) / seconds, p99 };
}

function sparkline(history) {
  const points = [];
  for (let i = 1; i < history.length; i++) {
    const grew = increase(history.slice(i - 1, i + 1), (h) => h.requests);
    points.push(grew / ((history[i].t - history[i - 1].t) / 1000));
  }
  const max = Math.max(1, ...points);
  const width = 160;
  const height = 32;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f80ed");
  line.setAttribute(
    "points",
    points.map((p, i) => `${(i / Math.max(1, points.length - 1)) * width},${height - (p / max) * (height - 2) - 1}`).join(" "),
  );
  svg.append(line);
  return svg;
}

async function appView(name) {
  const ns = namespace();
  const q = `namespace=${encodeURIComponent(ns)}`;
  const path = `/v1/apps/${encodeURIComponent(name)}`;
  const [d, rollout, events, metrics] = await Promise.all([
    api("GET", `${path}?${q}`),
    api("GET", `${path}/rollout?${q}`).catch(() => null),
    api("GET", `/v1/events?${q}&app=${encodeURIComponent(name)}&limit=50`),
    api("GET", "/v1/metrics").catch(() => null),
  ]);
  $("#revision").textContent = d.app.revision;
  const scale = $("#scale-replicas");
  if (document.activeElement !== scale) scale.value = d.app.spec.replicas;

  const key = `${ns}/${name}`;
  const history = samples.get(key) || [];
  if (typeof metrics === "string") {
    history.push({ t: Date.now(), ...appCounters(metrics, ns, name) });
    while (history.length > 150) history.shift();
    samples.set(key, history);
  }
  const r = rates(history.slice(-30));
  const stat = (id, label, value) => el("div", { class: "stat", id }, el("b", { text: value }), label);
  fill(
    $("#stats"),
    stat("rps", "requests/s (last minute)", r ? r.rps.toFixed(1) : "–"),
    stat("eps", "5xx/s", r ? r.eps.toFixed(2) : "–"),
    stat("p99", "p99", r && r.p99 !== null ? (r.p99 === Infinity ? "> max" : `≤ ${Math.round(r.p99 * 1000)} ms`) : "–"),
    el("div", { class: "stat" }, sparkline(history), "requests/s, last 5 minutes"),
  );

  if (rollout && rollout.status) {
    const s = rollout.status;
    const parts = [
      el(
        "p",
        { id: "rollout-status" },
        `revision ${s.revision}: ${s.phase}${s.paused ? " (paused)" : ""}`,
        rollout.weight != null ? ` · canary weight ${rollout.weight}%` : "",
        s.message ? ` · ${s.message}` : "",
      ),
      table(
        ["REVISION", "REPLICAS", "READY"],
        rollout.revisions.map((c) => el("tr", { "data-revision": c.revision }, el("td", { text: c.revision }), el("td", { text: c.replicas }), el("td", { text: c.ready }))),
        { id: "rollout-revisions" },
      ),
    ];
    if (rollout.canary && rollout.stable) {
      parts.push(
        el("p", { text: `canary: ${rollout.canary.requests} requests, ${rollout.canary.errors} errors · stable: ${rollout.stable.requests} requests, ${rollout.stable.errors} errors` }),
      );
    }
    fill($("#rollout"), ...parts);
  } else {
    fill($("#rollout"), el("p", { class: "muted", text: "No rollout." }));
  }

  const byNode = [...d.replicas].sort((a, b) => `${a.node}${a.id}`.localeCompare(`${b.node}${b.id}`));
  fill(
    $("#replicas"),
    table(
      ["NODE", "REPLICA", "REVISION", "PHASE", "RESTARTS", "MESSAGE"],
      byNode.map((x) =>
        el(
          "tr",
          { "data-replica": x.id },
          el("td", {}, x.node ? el("a", { href: `#/node/${encodeURIComponent(x.node)}`, text: x.node }) : "–"),
          el("td", { text: x.id }),
          el("td", { text: x.revision }),
          el("td", { class: x.phase === "Ready" ? "ok" : "", text: x.phase }),
          el("td", { text: x.restarts }),
          el("td", { class: "muted", text: x.message || "" }),
        ),
      ),
      { id: "replicas-table" },
    ),
  );
  fill(
    $("#revisions"),
    table(
      ["REVISION", "MODULE", "CAUSE", "OUTCOME", "AGE"],
      [...d.revisions].reverse().map((v) =>
        el(
          "tr",
          { "data-revision": v.number },
          el("td", { text: v.number }),
          el("td", { text: v.template.component.digest.slice(7, 19) }),
          el("td", { text: v.cause }),
          el("td", { text: v.outcome || (v.number === d.app.revision ? "current" : "") }),
          el("td", { text: ago(v.created_at) }),
        ),
      ),
      { id: "revisions-table" },
    ),
  );
  fill($("#events"), eventsTable(events));
}

// Seq of an entry Shoal writes in a replica's place (lines it could not read or lost).
const NOTICE_SEQ = 2 ** 63;

// Follows the app's logs into the page until the view changes, as `shoal logs -f` does:
// NDJSON entries, each replica's shown once, and when the stream breaks (a server
// restarted) it follows on from a little before the last lines shown.
async function startLogs(name) {
  const pre = $("#logs");
  const abort = new AbortController();
  logsAbort = abort;
  const next = new Map(); // replica -> [next seq due, time of the last line shown]
  const base = `/v1/apps/${encodeURIComponent(name)}/logs?namespace=${encodeURIComponent(namespace())}&follow=true&format=json`;
  let url = `${base}&tail=100`;
  const show = (text) => {
    pre.append(text);
    // The last 500 lines.
    const lines = pre.textContent.split("\n");
    if (lines.length > 500) pre.textContent = lines.slice(-500).join("\n");
    pre.scrollTop = pre.scrollHeight;
  };
  while (!abort.signal.aborted) {
    try {
      const response = await fetch(url, { headers: { Authorization: "Bearer " + token() }, signal: abort.signal });
      if (response.status === 401 || response.status === 403 || response.status === 404) {
        pre.textContent = `Logs not shown: ${response.status}`;
        return;
      }
      if (response.ok) {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let pending = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          pending += decoder.decode(value, { stream: true });
          const lines = pending.split("\n");
          pending = lines.pop();
          let text = "";
          for (const line of lines) {
            if (!line) continue;
            const e = JSON.parse(line);
            const [due] = next.get(e.replica) || [0];
            if (e.seq < due) continue;
            if (e.seq < NOTICE_SEQ) next.set(e.replica, [e.seq + 1, e.time]);
            text += `${e.replica} ${e.stream} ${e.line}\n`;
          }
          if (text) show(text);
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    // Broken, ended or refused for now: again in a moment, from a little before the oldest
    // of the replicas' last lines (5 s for the clocks to differ), or as at first.
    await new Promise((resume) => setTimeout(resume, REFRESH_MS));
    const times = [...next.values()].map(([, time]) => time);
    if (times.length) url = `${base}&since_ms=${Math.max(0, Date.now() - Math.min(...times)) + 5000}`;
  }
}

function stopLogs() {
  if (logsAbort) logsAbort.abort();
  logsAbort = null;
}

// ---- A node: capacity, labels, replicas; cordon, uncordon, drain.

function nodeLayout(view, name) {
  const action = (a) =>
    el("button", {
      "data-action": a,
      text: a[0].toUpperCase() + a.slice(1),
      onclick: () => act(a, "POST", `/v1/nodes/${encodeURIComponent(name)}/${a}`),
    });
  fill(
    view,
    el("h1", {}, "Node ", el("span", { id: "node-name", text: name })),
    el("div", { class: "actions" }, action("cordon"), action("uncordon"), action("drain")),
    el("div", { id: "node" }),
    el("h2", { id: "replicas-heading", text: "Replicas" }),
    el("div", { id: "replicas" }),
  );
}

async function nodeView(name) {
  const [nodes, replicas] = await Promise.all([
    api("GET", "/v1/nodes"),
    api("GET", `/v1/replicas?namespace=${encodeURIComponent(namespace())}`),
  ]);
  const n = nodes.find((x) => x.name === name);
  if (!n) {
    fill($("#node"), el("p", { class: "bad", text: `No node ${name}.` }));
    return;
  }
  const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  fill(
    $("#node"),
    table(
      ["", ""],
      [
        el("tr", {}, el("td", { text: "State" }), el("td", { id: "node-state", text: n.state + (n.schedulable ? "" : ", cordoned") + (n.draining ? ", draining" : "") })),
        el("tr", {}, el("td", { text: "Gateway" }), el("td", { text: n.gateway })),
        el("tr", {}, el("td", { text: "CPU" }), el("td", {}, bar(n.allocated.cpu_millis, n.capacity.cpu_millis), ` ${n.allocated.cpu_millis}m / ${n.capacity.cpu_millis}m`)),
        el("tr", {}, el("td", { text: "Memory" }), el("td", {}, bar(n.allocated.memory_bytes, n.capacity.memory_bytes), ` ${mib(n.allocated.memory_bytes)} / ${mib(n.capacity.memory_bytes)}`)),
        el("tr", {}, el("td", { text: "Labels" }), el("td", { text: labels || "–" })),
        el("tr", {}, el("td", { text: "Heartbeat" }), el("td", { text: `${ago(n.last_heartbeat)} ago` })),
      ],
    ),
  );
  const here = replicas.filter((r) => r.node === name);
  // The node's count on the overview is every namespace's; this list is one's.
  $("#replicas-heading").textContent = `Replicas of namespace ${namespace()}`;
  fill(
    $("#replicas"),
    table(
      ["APP", "REPLICA", "REVISION", "PHASE"],
      here.map((r) =>
        el(
          "tr",
          { "data-replica": r.id },
          el("td", {}, el("a", { href: `#/app/${encodeURIComponent(r.app.name)}`, text: r.app.name })),
          el("td", { text: r.id }),
          el("td", { text: r.revision }),
          el("td", { text: r.phase }),
        ),
      ),
    ),
  );
}

// ---- Signing in and out, and the router.

function showSignIn() {
  $("#view").replaceChildren();
  $("#signin-view").hidden = false;
  $("#signout").hidden = true;
  // A token kept to some namespaces signs in with one of them.
  $("#namespace-label").hidden = false;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopLogs();
  clearInterval(refreshTimer);
  showError(message || "");
  showSignIn();
}

// Shows the view the address names; `fresh`: lay it out again (a new view) rather than only
// refresh its contents.
async function route(fresh = true) {
  if (fresh) {
    clearInterval(refreshTimer);
    stopLogs();
    showError("");
  }
  if (!token()) {
    showSignIn();
    return;
  }
  $("#signin-view").hidden = true;
  $("#signout").hidden = false;
  $("#namespace-label").hidden = false;
  const hash = location.hash || "#/";
  // A name in the address that does not decode (`%E0%A4%A`) names nothing: the overview.
  const decoded = (m) => {
    try {
      return m && decodeURIComponent(m[1]);
    } catch (_) {
      showError(`not an address of this dashboard: ${hash}`);
      return null;
    }
  };
  const app = decoded(hash.match(/^#\/app\/([^/]+)$/));
  const node = decoded(hash.match(/^#\/node\/([^/]+)$/));
  const view = $("#view");
  let render;
  if (app) {
    if (fresh) appLayout(view, app);
    render = () => appView(app);
  } else if (node) {
    if (fresh) nodeLayout(view, node);
    render = () => nodeView(node);
  } else {
    if (fresh) overviewLayout(view);
    render = overview;
  }
  const tick = async () => {
    try {
      await render();
      if (bannerFromRefresh) showError("");
    } catch (e) {
      if (e.message !== "unauthorized") showError(e.message, true);
    }
  };
  await tick();
  if (fresh) {
    refreshTimer = setInterval(tick, REFRESH_MS);
    if (app) startLogs(app);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    showError("");
    try {
      // Any read this token may make shows it works.
      await api("GET", `/v1/apps?namespace=${encodeURIComponent(namespace())}`);
    } catch (e) {
      if (e.message !== "unauthorized") showError(e.message);
      return;
    }
    route();
  });
  $("#signout").addEventListener("click", () => signOut());
  // The namespace chosen outlives a reload, as the token does.
  $("#namespace").value = sessionStorage.getItem(NAMESPACE_KEY) || "default";
  $("#namespace").addEventListener("change", () => {
    sessionStorage.setItem(NAMESPACE_KEY, namespace());
    route();
  });
  window.addEventListener("hashchange", () => route());
  route();
});
