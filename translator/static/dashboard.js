// coap-ws-gateway's dashboard: the page at `/` (index.html, dashboard.css), built on the
// gateway's own client (/client.js), which reconnects and resubscribes by itself.
//
// A live table of every resource `list` returns: state, last value, its age, a sparkline of
// numeric values, and a toggle for boolean values; a form for any request. It stays usable
// at hundreds of resources: updates only mark a row dirty, and the dirty rows' cells are
// rewritten (only where their text changed) at most every RENDER_EVERY ms, in an animation
// frame, and only for rows on screen (the others when they scroll into view); each
// sparkline keeps at most SPARK_POINTS values. Each row's data-* attributes (state, seq,
// epoch, points) are kept current on or off screen, for tests and automation.
//
// The token, when the gateway asks for one, is kept in this tab's sessionStorage and sent by
// the client on the WebSocket URL it opens; it never appears in the address bar.

import { GatewayClient } from "/client.js";

const TOKEN_KEY = "coap-ws-gateway.token";
const SPARK_POINTS = 60;    // numeric values kept per resource for its sparkline
const SPARK_WIDTH = 112;    // the sparkline's viewBox, in CSS pixels
const SPARK_HEIGHT = 22;
const RENDER_EVERY = 100;   // ms: the table is redrawn at most this often
const SPARK_EVERY = 1000;   // ms: a sparkline at most this often (a trend needs no more, and
                            // SVG is what costs most to paint)
const RETRY_AFTER = {       // ms before subscribing again after these refusals (then jitter)
  rate_limited: 2000,       // the connection's frame budget: it refills within a second
  limit: 30000,             // max_subscriptions or max_observations: wait for room
  internal_error: 5000,
};
const MAX_TOGGLES = 3;      // boolean fields of one value that get a button

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), summary: $("summary"), filter: $("filter"),
  forgetToken: $("forget-token"), tokenForm: $("token-form"), token: $("token"),
  tokenMessage: $("token-message"), rows: $("rows"), empty: $("empty"),
  requestForm: $("request-form"), method: $("method"), target: $("target"),
  value: $("value"), send: $("send"), response: $("response"), targets: $("targets"),
};

const rows = new Map();     // normalized URI -> Row
const dirty = new Set();    // rows whose cells are behind their data
const rowOf = new WeakMap(); // <tr> -> Row
let gw = null;              // the current GatewayClient (a new one per token)
let renderTimer = null;
let lastRender = 0;
let waitingUntil = 0;       // while disconnected: when the client tries again (ms)

// --- what a value looks like ---------------------------------------------------------------

function isSenml(value) {
  return Array.isArray(value) && value.length > 0
    && value.every((r) => r !== null && typeof r === "object" && ("n" in r || "bn" in r));
}

function formatNumber(number) {
  return Number.isInteger(number) ? String(number) : String(Number(number.toPrecision(6)));
}

/** The cell text of a decoded value: SenML records as "value unit", numbers shortened,
 * strings as they are, anything else as compact JSON. */
function formatValue(value) {
  if (typeof value === "number") return formatNumber(value);
  if (typeof value === "string") return value;
  if (isSenml(value)) {
    return value.map((r) => {
      const v = r.v ?? r.vs ?? r.vb ?? r.vd ?? r.s ?? "";
      return `${typeof v === "number" ? formatNumber(v) : v} ${r.u ?? ""}`.trim();
    }).join(", ");
  }
  return JSON.stringify(value);
}

/** The number a value contributes to the sparkline, or null. */
function numericOf(value) {
  if (typeof value === "number" && Number.isFinite(value)) return value;
  if (typeof value === "boolean") return value ? 1 : 0;
  if (isSenml(value) && value.length === 1 && typeof value[0].v === "number") return value[0].v;
  return null;
}

/** What a notify frame, a response or a listing entry carries, for the value cell. */
function describe(carrier) {
  if ("value" in carrier) {
    return { has: true, value: carrier.value, text: formatValue(carrier.value), kind: "" };
  }
  if (carrier.decode_error) {
    return { has: false, text: `undecodable: ${carrier.decode_error}`, kind: "problem" };
  }
  if (typeof carrier.payload_b64 === "string") {
    const b64 = carrier.payload_b64;
    const bytes = Math.floor(b64.length * 3 / 4) - (b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0);
    return { has: false, text: `${bytes} bytes (cf ${carrier.cf ?? "none"})`, kind: "absent" };
  }
  return { has: false, text: "(empty)", kind: "absent" };
}

/** The boolean fields a value offers to toggle: [{field, on}], field null for a bare boolean. */
function toggles(value) {
  if (typeof value === "boolean") return [{ field: null, on: value }];
  if (value === null || typeof value !== "object" || Array.isArray(value)) return [];
  return Object.entries(value).filter(([, v]) => typeof v === "boolean")
    .slice(0, MAX_TOGGLES).map(([field, on]) => ({ field, on }));
}

function flipped(value, field) {
  return field === null ? !value : { ...value, [field]: !value[field] };
}

function toggleLabel(field, on) {
  if (field === null || field === "on") return on ? "Turn off" : "Turn on";
  return `Set ${field} ${!on}`;
}

function formatAge(seconds) {
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

function svg(tag, attributes = {}) {
  const made = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  return made;
}

/** Set a text only when it changed: a DOM write costs more than the comparison. */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setAttribute(node, name, value) {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
}

// --- one row per resource ------------------------------------------------------------------

class Row {
  constructor(entry) {
    this.uri = entry.uri;
    this.name = entry.name ?? null;
    this.state = null;          // online, stale, offline; "error" when not subscribed
    this.reason = "";
    this.shown = null;          // describe() of the latest value
    this.ts = null;             // when the gateway got it (Unix seconds)
    this.seq = 0;
    this.epoch = "";            // the gateway's stream the seq belongs to
    this.points = [];           // the last SPARK_POINTS numeric values
    this.subscription = null;
    this.togglesKey = "";
    this.sparkDrawn = -Infinity; // when its sparkline was last drawn (performance.now())
    this.sparkBehind = false;
    this.visible = false;       // on screen (or nearly): its cells are kept current
    this.behind = false;        // off screen with cells behind its data
    this.build();
    rowOf.set(this.tr, this);
    onScreen.observe(this.tr);
  }

  get target() {
    return this.name ?? this.uri;
  }

  build() {
    const tr = element("tr");
    tr.dataset.uri = this.uri;
    if (this.name !== null) tr.dataset.name = this.name;
    const name = element("td", "name");
    if (this.name !== null) {
      const link = element("a", "", this.name);
      link.href = "#request-form";
      link.title = "Make this resource the request's target";
      link.addEventListener("click", (event) => {
        event.preventDefault();
        chooseTarget(this);
      });
      name.append(link);
    } else {
      name.append(element("span", "anonymous", "discovered"));
    }
    const uri = element("td", "uri", this.uri);
    uri.title = this.uri;
    this.stateBadge = element("span", "state", "—");
    const state = element("td");
    state.append(this.stateBadge);
    this.valueCell = element("td", "value absent", "—");
    this.ageCell = element("td", "age", "—");
    this.spark = svg("svg", {
      class: "spark", viewBox: `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`, "aria-hidden": "true",
    });
    this.line = svg("polyline", { points: "" });
    this.dot = svg("circle", { r: "2", cx: "-10", cy: "-10" });
    this.spark.append(this.line, this.dot);
    const trend = element("td", "trend");
    trend.append(this.spark);
    this.actions = element("td", "actions");
    tr.append(name, uri, state, this.valueCell, this.ageCell, trend, this.actions);
    this.tr = tr;
  }

  /** A `resources` entry: fills what no frame has told yet (the first paint). */
  listed(entry) {
    if (this.state === null && typeof entry.state === "string") this.state = entry.state;
    if (this.shown === null && ("value" in entry || "payload_b64" in entry)) {
      this.accept(entry, entry.ts ?? entry.last_update ?? null);
    }
  }

  notify(frame, epoch) {
    this.seq = frame.seq;
    this.epoch = epoch ?? "";
    this.accept(frame, frame.ts);
  }

  accept(carrier, ts) {
    this.shown = describe(carrier);
    this.ts = typeof ts === "number" ? ts : null;
    const number = this.shown.has ? numericOf(this.shown.value) : null;
    if (number !== null) {
      this.points.push(number);
      if (this.points.length > SPARK_POINTS) this.points.shift();
      this.sparkBehind = true;
    }
  }

  status(frame) {
    this.state = frame.state;
    this.reason = frame.reason ?? "";
  }

  refused(frame, retrying) {
    this.state = retrying ? null : "error";
    this.reason = retrying ? `subscribing again (${frame.error}: ${frame.message})`
      : `not subscribed: ${frame.error}: ${frame.message}`;
  }

  matches(query) {
    return query === "" || this.uri.toLowerCase().includes(query)
      || (this.name ?? "").toLowerCase().includes(query);
  }

  /** Bring the row's cells up to its data; false when its sparkline still waits for its
   * turn (SPARK_EVERY), so that the row is rendered again. */
  render(now) {
    const state = this.state ?? "unknown";
    this.tr.dataset.state = state;
    this.tr.dataset.seq = String(this.seq);
    this.tr.dataset.epoch = this.epoch;
    this.tr.dataset.points = String(this.points.length);
    if (!this.visible) {
      this.behind = true;  // drawn when it scrolls into view: nobody sees it now
      return true;
    }
    this.behind = false;
    setText(this.stateBadge, this.state === "error" ? "error" : this.state ?? "—");
    setAttribute(this.stateBadge, "data-state", state);
    setAttribute(this.stateBadge, "title", this.reason || state);
    if (this.shown !== null) {
      setText(this.valueCell, this.shown.text);
      setAttribute(this.valueCell, "class", `value ${this.shown.kind}`.trim());
      const full = this.shown.has ? JSON.stringify(this.shown.value, null, 1) : this.shown.text;
      setAttribute(this.valueCell, "title", full.length > 2000 ? `${full.slice(0, 2000)}…` : full);
    }
    this.renderToggles();
    this.renderAge(Date.now() / 1000);
    if (this.sparkBehind && now - this.sparkDrawn >= SPARK_EVERY) {
      this.sparkDrawn = now;
      this.sparkBehind = false;
      this.renderSpark();
    }
    return !this.sparkBehind;
  }

  renderAge(now) {
    if (this.ts === null) return;
    const age = Math.max(0, now - this.ts);
    setText(this.ageCell, formatAge(age));
    setAttribute(this.ageCell, "class", age < 5 ? "age fresh" : "age");
  }

  renderSpark() {
    const points = this.points;
    if (points.length < 2) return;
    const low = Math.min(...points);
    const high = Math.max(...points);
    const span = high - low || 1;
    const last = points.length - 1;
    const xy = points.map((v, i) => {
      const x = (i / last) * SPARK_WIDTH;
      const y = high === low ? SPARK_HEIGHT / 2 : 2 + (SPARK_HEIGHT - 4) * (1 - (v - low) / span);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    this.line.setAttribute("points", xy.join(" "));
    const [x, y] = xy[last].split(",");
    this.dot.setAttribute("cx", x);
    this.dot.setAttribute("cy", y);
    this.spark.setAttribute("aria-label", `last ${points.length} values, ${formatNumber(low)} to ${formatNumber(high)}`);
  }

  renderToggles() {
    const offered = this.shown?.has ? toggles(this.shown.value) : [];
    const key = offered.map((t) => `${t.field}=${t.on}`).join(",");
    if (key === this.togglesKey) return;
    this.togglesKey = key;
    this.actions.replaceChildren(...offered.map(({ field, on }) => {
      const button = element("button", "toggle", toggleLabel(field, on));
      button.type = "button";
      button.dataset.field = field ?? "";
      button.setAttribute("aria-pressed", String(on));
      const next = flipped(this.shown.value, field);
      button.title = `PUT ${this.target} ${JSON.stringify(next)}`;
      button.addEventListener("click", () => this.toggle(field, button));
      return button;
    }));
  }

  async toggle(field, button) {
    if (!this.shown?.has) return;
    const value = flipped(this.shown.value, field);
    button.disabled = true;
    try {
      await send("PUT", this.target, { value });
    } finally {
      button.disabled = false;
    }
  }
}

// --- rendering, throttled -------------------------------------------------------------------

// Rows within a screen's height of the viewport count as visible, so that scrolling finds
// them drawn already.
const onScreen = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const row = rowOf.get(entry.target);
    if (row === undefined) continue;
    row.visible = entry.isIntersecting;
    if (row.visible && row.behind) changed(row);
  }
}, { rootMargin: "100% 0px" });

function changed(row) {
  dirty.add(row);
  schedule();
}

function schedule() {
  if (renderTimer !== null) return;
  const wait = Math.max(0, lastRender + RENDER_EVERY - performance.now());
  // The timer spaces renders out; the animation frame puts each where the browser paints
  // (and skips them while the tab is hidden).
  renderTimer = setTimeout(() => requestAnimationFrame(render), wait);
}

function render() {
  renderTimer = null;
  lastRender = performance.now();
  for (const row of dirty) {
    if (row.render(lastRender)) dirty.delete(row);
  }
  renderSummary();
  if (dirty.size > 0) schedule();
}

function renderSummary() {
  const counts = { online: 0, stale: 0, offline: 0 };
  for (const row of rows.values()) {
    if (row.state in counts) counts[row.state] += 1;
  }
  const parts = [`${rows.size} resource${rows.size === 1 ? "" : "s"}`];
  for (const [state, count] of Object.entries(counts)) {
    if (count) parts.push(`${count} ${state}`);
  }
  setText(ui.summary, parts.join(" · "));
  ui.empty.hidden = rows.size > 0;
}

/** Every second: the ages, and the countdown to the next connection attempt. */
function tick() {
  const now = Date.now() / 1000;
  for (const row of rows.values()) {
    if (row.visible) row.renderAge(now);
  }
  if (gw?.state === "waiting") {
    const seconds = Math.max(0, Math.ceil((waitingUntil - Date.now()) / 1000));
    setText(ui.connection, seconds > 0 ? `reconnecting in ${seconds} s` : "reconnecting…");
  }
}

function placeRows() {
  const sorted = [...rows.values()].sort((a, b) => {
    if ((a.name === null) !== (b.name === null)) return a.name === null ? 1 : -1;
    return (a.name ?? a.uri).localeCompare(b.name ?? b.uri);
  });
  ui.rows.append(...sorted.map((row) => row.tr));
  ui.targets.replaceChildren(...sorted.map((row) => {
    const option = element("option");
    option.value = row.target;
    return option;
  }));
  applyFilter();
}

function applyFilter() {
  const query = ui.filter.value.trim().toLowerCase();
  for (const row of rows.values()) row.tr.hidden = !row.matches(query);
}

// --- the connection -------------------------------------------------------------------------

function showConnection(state, text, title = "") {
  ui.connection.dataset.state = state;
  setText(ui.connection, text);
  ui.connection.title = title;
  document.body.dataset.connection = state === "open" ? "up" : "down";
}

function start() {
  if (gw !== null) gw.close();
  for (const row of rows.values()) row.subscription = null;
  const token = sessionStorage.getItem(TOKEN_KEY);
  ui.forgetToken.hidden = token === null;
  ui.tokenForm.hidden = true;
  // The client's first "connecting" comes from its constructor, before a listener is in.
  showConnection("connecting", "connecting…");
  const client = new GatewayClient(undefined, token === null ? {} : { token });
  gw = client;
  let failedHandshake = true;
  client.onState((state, info) => {
    if (client !== gw) return;
    if (state === "open") {
      failedHandshake = false;
      showConnection("open", "connected");
      list(client);
    } else if (state === "connecting") {
      failedHandshake = true;
      showConnection("connecting", info.attempt ? "reconnecting…" : "connecting…");
    } else if (state === "waiting") {
      waitingUntil = Date.now() + info.delay;
      const why = info.reason ? `${info.reason}` : `closed (${info.code ?? "no code"})`;
      showConnection("waiting", `reconnecting in ${Math.ceil(info.delay / 1000)} s`, why);
      // A browser does not say why a handshake failed: ask the endpoint over plain HTTP,
      // which answers 401 when a token is needed (or this one is not accepted).
      if (failedHandshake) diagnose(client, token);
    }
  });
}

async function diagnose(client, token) {
  let answer;
  try {
    answer = await fetch("/ws", {
      cache: "no-store",
      headers: token === null ? {} : { Authorization: `Bearer ${token}` },
    });
  } catch {
    return;  // the gateway is not there: the client keeps trying
  }
  if (client !== gw || answer.status !== 401) return;
  client.close();
  askForToken(token === null ? "This gateway needs a token."
    : "The gateway did not accept this token.");
}

function askForToken(message) {
  showConnection("token", "token needed");
  ui.tokenForm.hidden = false;
  setText(ui.tokenMessage, `${message} It is kept in this tab's session storage, never in the address bar.`);
  ui.tokenMessage.classList.add("problem");
  ui.token.focus();
}

/** A token in the address (an old link, `/?access_token=...`) moves to sessionStorage and
 * out of the address bar and history at once. */
function adoptTokenFromAddress() {
  const address = new URL(location.href);
  const token = address.searchParams.get("access_token");
  if (token === null) return;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  address.searchParams.delete("access_token");
  history.replaceState(null, "", address.pathname + address.search + address.hash);
}

async function list(client) {
  let resources;
  try {
    resources = await client.list();
  } catch (error) {
    if (client !== gw || error.code === "disconnected" || error.code === "closed") return;
    if (["rate_limited", "limit", "no_reply"].includes(error.code)) {
      setTimeout(() => client === gw && client.state === "open" && list(client), 2000);
    } else {
      setText(ui.empty, `The gateway did not list its resources: ${error.message}`);
    }
    return;
  }
  if (client !== gw) return;
  let added = false;
  for (const entry of resources) {
    if (entry.uri.endsWith("/.well-known/core")) continue;  // discovery, not a reading
    let row = rows.get(entry.uri);
    if (row === undefined) {
      row = new Row(entry);
      rows.set(entry.uri, row);
      added = true;
    }
    row.listed(entry);
    if (row.subscription === null) subscribe(row, client);
    changed(row);
  }
  if (added) placeRows();
  if (rows.size === 0) setText(ui.empty, "The gateway lists no resources for this token.");
  renderSummary();
}

function subscribe(row, client) {
  row.subscription = client.subscribe(row.target, {
    onNotify: (frame, subscription) => { row.notify(frame, subscription.epoch); changed(row); },
    onStatus: (frame) => { row.status(frame); changed(row); },
    onError: (frame) => {
      const wait = RETRY_AFTER[frame.error];
      row.subscription = null;
      row.refused(frame, wait !== undefined);
      changed(row);
      if (wait === undefined) return;
      setTimeout(() => {
        if (client === gw && row.subscription === null) subscribe(row, client);
      }, wait * (0.5 + Math.random()));
    },
  });
}

// --- requests -------------------------------------------------------------------------------

function showResponse(outcome, text, code = "") {
  ui.response.dataset.outcome = outcome;
  ui.response.dataset.code = code;
  ui.response.textContent = text;
}

async function send(method, target, options) {
  const what = `${method} ${target}${"value" in options ? ` ${JSON.stringify(options.value)}` : ""}`;
  if (gw === null || gw.state === "closed") {
    showResponse("failure", `${what}\nnot connected`);
    return;
  }
  showResponse("pending", `${what}\n…`);
  try {
    const frame = await gw.request(method, target, options);
    const { type, id, ...shown } = frame;
    showResponse(frame.code.startsWith("2.") ? "success" : "failure",
      `${what} → ${frame.code}\n${JSON.stringify(shown, null, 2)}`, frame.code);
  } catch (error) {
    showResponse("failure", `${what} → ${error.code}\n${error.message}`, error.code ?? "");
  }
}

function chooseTarget(row) {
  ui.target.value = row.target;
  if (ui.value.value.trim() === "" && row.shown?.has && typeof row.shown.value === "object") {
    ui.value.value = JSON.stringify(row.shown.value);
  }
  ui.target.focus();
}

ui.requestForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const options = {};
  const text = ui.value.value.trim();
  if (text !== "") {
    try {
      options.value = JSON.parse(text);
    } catch (error) {
      showResponse("failure", `The value is not JSON: ${error.message}`);
      return;
    }
  }
  send(ui.method.value, ui.target.value.trim(), options);
});

ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.token.value.trim();
  if (token === "") return;
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.token.value = "";
  start();
});

ui.forgetToken.addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  start();
});

ui.filter.addEventListener("input", applyFilter);

adoptTokenFromAddress();
start();
setInterval(tick, 1000);
