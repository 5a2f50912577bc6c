// coap-ws-gateway's JavaScript client: one ES module, no build step, no dependency.
// Served by the gateway at /client.js (types at /client.d.ts); docs/client.md shows how to
// use it. Runs in browsers and in Node 22+ (Node 20 with --experimental-websocket), or
// anywhere else a WebSocket constructor is passed in `options.WebSocket`.
//
// What it adds to a bare WebSocket (docs/protocol.md is the protocol it speaks):
// * it reconnects by itself, with exponential backoff and jitter, until close();
// * it subscribes again after a reconnect with `since`, so each subscription sees every
//   update exactly once when the gateway's history still holds what was missed, and is told
//   (onResync) when it does not;
// * it matches replies by id, and rejects a request in flight when the connection drops:
//   a request may not be idempotent, so it is never sent a second time.

const DEFAULTS = Object.freeze({
  backoffInitial: 500,   // ms before the first reconnect attempt
  backoffMax: 30000,     // ms, the longest wait between attempts
  requestMargin: 5000,   // ms added to a request's own timeout before the client gives up
  heartbeat: 20000,      // ms between protocol pings; no pong within as long: reconnect
});

const GATEWAY_REQUEST_TIMEOUT = 10; // s: the gateway's default request timeout (protocol §13)

/** A refusal: an `error` frame from the gateway, or one the client makes up (`code`
 * "disconnected", "no_reply" or "closed", with `frame` null). */
export class GatewayError extends Error {
  constructor(code, message, frame = null) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
    this.frame = frame;
  }
}

function isUri(nameOrUri) {
  // Sensor names never hold "://" (they are configured names such as "kitchen/temperature").
  return nameOrUri.includes("://");
}

function target(nameOrUri) {
  if (typeof nameOrUri !== "string" || nameOrUri === "") {
    throw new TypeError("a sensor name or a coap:// URI is needed");
  }
  return isUri(nameOrUri) ? { uri: nameOrUri } : { name: nameOrUri };
}

function defaultUrl() {
  const location = globalThis.location;
  if (!location) throw new TypeError("a ws:// or wss:// URL is needed outside a browser");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

/** The notify fields a compact frame carries only when they changed (protocol.md §18). */
const HEADER_FIELDS = ["uri", "code", "cf", "max_age"];

/** One subscription of the application; survives reconnects until unsubscribe(). */
class Subscription {
  constructor(client, nameOrUri, callbacks) {
    this._client = client;
    this.target = nameOrUri;
    this._callbacks = callbacks;
    // Conditional notifications (pmin, pmax, gt, lt, st, band, edge, path): sent with every
    // subscribe, the first one and each after a reconnect.
    this.cond = callbacks.cond ?? null;
    this.compact = callbacks.compact === true;
    this._header = {};   // compact: the last uri, code, cf and max_age the gateway sent
    this.sub = null;     // the gateway's `sub`, once subscribed
    this.uri = null;     // the normalized URI, once subscribed
    this.epoch = null;   // the stream the seqs below belong to
    this.seq = 0;        // the last seq delivered to onNotify (0: none yet)
    this.closed = false;
    this._live = false;  // subscribed on the current connection: its frames are ours
    this._waiters = [];
  }

  /** Stop: no callback runs after this returns. */
  unsubscribe() {
    if (this.closed) return;
    this.closed = true;
    this._client._dropSubscription(this);
    this._settle(new GatewayError("closed", "unsubscribed"));
  }

  /** Resolves with the first `subscribed` frame, rejects with the error that refused the
   * subscription. Made on demand, so a refusal nobody waits for is no unhandled rejection. */
  ready() {
    if (this._first) return Promise.resolve(this._first);
    if (this._refused) return Promise.reject(this._refused);
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  _settle(error, frame) {
    if (frame) this._first ??= frame;
    else this._refused ??= error;
    for (const waiter of this._waiters.splice(0)) {
      if (frame) waiter.resolve(frame);
      else waiter.reject(error);
    }
  }

  _subscribed(frame) {
    const previous = this.epoch === null ? null : { epoch: this.epoch, seq: this.seq };
    this.sub = frame.sub;
    this.uri = frame.uri;
    this._live = true;
    if (frame.epoch === undefined || frame.epoch !== this.epoch) {
      // Another stream (a restarted gateway, a forgotten resource): its seqs start afresh.
      this.epoch = frame.epoch ?? null;
      this.seq = 0;
    }
    this._settle(null, frame);
    if (previous !== null && frame.recovered !== true) {
      // Updates were missed and will not be replayed: the next notify is the latest value.
      this._call("onResync", { previous, epoch: this.epoch, frame });
    }
  }

  _frame(frame) {
    if (!this._live || this.closed) return;
    if (frame.type === "notify") {
      // A seq at or below the last one delivered is a repeat (a cached value sent again on
      // subscribe, a replay another subscription of this client asked for).
      // A `pmax` repeat (`repeat: true`) is the last frame again, on purpose: delivered.
      if (typeof frame.seq === "number" && frame.seq <= this.seq && frame.repeat !== true) return;
      if (typeof frame.seq === "number") this.seq = frame.seq;
      this._call("onNotify", this.compact ? this._complete(frame) : frame);
    } else if (frame.type === "status") {
      this._call("onStatus", frame);
    }
  }

  /** A compact notify with the fields it left out (they did not change), so that onNotify
   * always gets a complete frame: the bytes are saved on the wire, not in the application. */
  _complete(frame) {
    for (const key of HEADER_FIELDS) if (key in frame) this._header[key] = frame[key];
    return { ...this._header, ...frame };
  }

  _call(name, argument) {
    const callback = this._callbacks[name];
    if (typeof callback !== "function") return;
    try {
      callback(argument, this);
    } catch (error) {
      // An application's callback must not break the client's frame loop.
      queueMicrotask(() => { throw error; });
    }
  }
}

export class GatewayClient {
  /**
   * @param {string} [url] ws:// or wss:// URL of the gateway's /ws (default: the page's own)
   * @param {object} [options] token, onState, onError, backoffInitial, backoffMax,
   *   requestMargin, heartbeat, WebSocket
   */
  constructor(url, options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const address = new URL(url ?? defaultUrl());
    // Browsers cannot set Authorization on a WebSocket: the gateway reads the token here.
    if (options.token) address.searchParams.set("access_token", options.token);
    this.url = address.toString();
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket here (Node 20 needs --experimental-websocket)");
    }
    this.state = "connecting";
    this._listeners = new Set();
    if (typeof options.onState === "function") this._listeners.add(options.onState);
    this._subscriptions = new Set();
    this._pending = new Map();  // id -> {resolve, reject, timer, sent, frame, subscription}
    this._nextId = 0;
    this._attempt = 0;
    this._ws = null;
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._connect();
  }

  /** Calls `listener(state, info)` on each change of `state`: "connecting", "open",
   * "waiting" (disconnected, the next attempt in `info.delay` ms) or "closed" (close()).
   * Returns a function that removes the listener. */
  onState(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  /** Subscribe to a sensor by name, or to a coap:// URI. Options: the callbacks
   * onNotify(frame), onStatus(frame), onResync({previous, epoch, frame}), onError(frame),
   * and `cond`, conditional notification parameters ({pmin, pmax, gt, lt, st, band, edge,
   * path}; docs/protocol.md), and `compact: true` (the gateway leaves unchanged fields out;
   * onNotify still gets them all). The gateway keeps one condition per resource and
   * connection: subscriptions of one client to the same resource share the last one sent. */
  subscribe(nameOrUri, callbacks = {}) {
    target(nameOrUri);
    if (callbacks.cond !== undefined && (typeof callbacks.cond !== "object" || callbacks.cond === null
        || Array.isArray(callbacks.cond))) {
      throw new TypeError("cond must be an object such as {pmin: 1, st: 0.5}");
    }
    const subscription = new Subscription(this, nameOrUri, callbacks);
    this._subscriptions.add(subscription);
    if (this.state === "open") this._sendSubscribe(subscription);
    return subscription;
  }

  /** A CoAP request: resolves with the `response` frame, rejects with a GatewayError.
   * options: value, payload_b64, cf, accept, timeout (s), confirmable. */
  request(method, nameOrUri, options = {}) {
    const frame = { type: "request", method, ...target(nameOrUri) };
    for (const key of ["value", "payload_b64", "cf", "accept", "timeout", "confirmable"]) {
      if (options[key] !== undefined) frame[key] = options[key];
    }
    const seconds = options.timeout ?? GATEWAY_REQUEST_TIMEOUT;
    return this._call(frame, seconds * 1000 + this.options.requestMargin);
  }

  /** The gateway's resources (the `resources` array of the `resources` frame). */
  list() {
    // A list may wait for discovery (5 s per host) before it is answered.
    return this._call({ type: "list" }, 10000 + this.options.requestMargin)
      .then((frame) => frame.resources);
  }

  /** Close for good: no reconnect; requests not answered yet are rejected ("closed"). */
  close() {
    if (this.state === "closed") return;
    clearTimeout(this._retryTimer);
    this._dropConnection(new GatewayError("closed", "the client was closed"));
    for (const entry of this._pending.values()) this._fail(entry, new GatewayError("closed", "the client was closed"));
    this._setState("closed", {});
  }

  // --- the connection ----------------------------------------------------------------------

  _connect() {
    this._setState("connecting", { attempt: this._attempt });
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      this._disconnected({ error });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._attempt = 0;
      this._setState("open", {});
      this._startHeartbeat();
      // Subscriptions first, then requests that waited for the connection: the gateway
      // answers subscribes in order, before anything a request brings.
      for (const subscription of this._subscriptions) this._sendSubscribe(subscription);
      for (const entry of this._pending.values()) {
        if (!entry.sent) this._transmit(entry);
      }
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._lastFrame = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;  // the gateway sends JSON text only
      }
      this._receive(frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._disconnected({ code: event.code, reason: event.reason });
    };
    ws.onerror = () => {
      // Browsers follow an error with a close event, but Node 20's WebSocket does not when
      // the handshake fails (a 401, a 503): the error is the end of this socket either way.
      if (this._ws !== ws) return;
      this._disconnected({ reason: "connection failed" });
    };
  }

  _disconnected(info) {
    this._dropConnection(new GatewayError("disconnected", "the connection to the gateway dropped"));
    if (this.state === "closed") return;
    const ceiling = Math.min(this.options.backoffMax, this.options.backoffInitial * 2 ** this._attempt);
    // Jitter spreads the clients of a restarted gateway over the interval, so that they do
    // not all come back in the same instant.
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this._attempt += 1;
    this._setState("waiting", { ...info, delay, attempt: this._attempt });
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  /** Forget the current socket: its subscriptions stop being live (they are sent again on
   * the next connection), and requests it carried are rejected, never sent again. */
  _dropConnection(error) {
    clearInterval(this._heartbeatTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(); } catch { /* already closing */ }
    }
    for (const subscription of this._subscriptions) subscription._live = false;
    for (const [id, entry] of this._pending) {
      if (entry.subscription || entry.internal) this._pending.delete(id);
      else if (entry.sent) this._fail(entry, error);
    }
  }

  _startHeartbeat() {
    const every = this.options.heartbeat;
    if (!every) return;
    this._lastFrame = Date.now();
    // A connection cut without a FIN or RST (a dead link, a suspended laptop) closes
    // nothing: only a missing answer shows it. Any frame counts as an answer.
    this._heartbeatTimer = setInterval(() => {
      if (Date.now() - this._lastFrame > 2 * every) {
        this._disconnected({ reason: "no answer to the heartbeat" });
        return;
      }
      this._call({ type: "ping" }, 0, true);
    }, every);
  }

  _setState(state, info) {
    this.state = state;
    for (const listener of [...this._listeners]) {
      try {
        listener(state, info);
      } catch (error) {
        queueMicrotask(() => { throw error; });
      }
    }
  }

  // --- frames ------------------------------------------------------------------------------

  _call(frame, timeoutMs, internal = false) {
    if (this.state === "closed") {
      return Promise.reject(new GatewayError("closed", "the client was closed"));
    }
    const id = `c${++this._nextId}`;
    return new Promise((resolve, reject) => {
      const entry = { id, frame: { ...frame, id }, resolve, reject, sent: false, internal };
      if (!internal) {
        entry.timer = setTimeout(() => this._fail(entry, new GatewayError(
          "no_reply", `no reply from the gateway within ${timeoutMs} ms`)), timeoutMs);
      }
      this._pending.set(id, entry);
      if (this.state === "open") this._transmit(entry);
    });
  }

  _transmit(entry) {
    entry.sent = true;
    this._ws.send(JSON.stringify(entry.frame));
  }

  _fail(entry, error) {
    clearTimeout(entry.timer);
    this._pending.delete(entry.id);
    entry.reject(error);
  }

  _sendSubscribe(subscription) {
    const frame = { type: "subscribe", ...target(subscription.target) };
    if (subscription.compact) frame.compact = true;
    if (subscription.epoch !== null) frame.since = { epoch: subscription.epoch, seq: subscription.seq };
    if (subscription.cond !== null) frame.cond = subscription.cond;
    const id = `c${++this._nextId}`;
    this._pending.set(id, { id, subscription, sent: true });
    this._ws.send(JSON.stringify({ ...frame, id }));
  }

  _dropSubscription(subscription) {
    this._subscriptions.delete(subscription);
    subscription._live = false;
    this._unsubscribeIfUnused(subscription.sub);
  }

  /** The gateway has one `sub` per resource: it is released only when no subscription of
   * this client still uses it. */
  _unsubscribeIfUnused(sub) {
    if (sub === null || this.state !== "open") return;
    for (const other of this._subscriptions) {
      if (other.sub === sub && other._live) return;
    }
    this._call({ type: "unsubscribe", sub }, 0, true).catch(() => {});
  }

  _receive(frame) {
    if (frame.type === "notify" || frame.type === "status") {
      for (const subscription of [...this._subscriptions]) {
        if (subscription.sub === frame.sub) subscription._frame(frame);
      }
      return;
    }
    const entry = frame.id === null || frame.id === undefined ? undefined : this._pending.get(frame.id);
    if (entry === undefined) {
      if (frame.type === "error") this._report(frame);
      return;
    }
    this._pending.delete(entry.id);
    clearTimeout(entry.timer);
    if (entry.subscription) {
      const subscription = entry.subscription;
      if (frame.type === "subscribed") {
        if (subscription.closed) {
          subscription.sub = frame.sub;
          this._unsubscribeIfUnused(frame.sub);
        } else {
          subscription._subscribed(frame);
        }
      } else if (!subscription.closed) {
        // Refused (not_found, forbidden, limit...): the subscription ends.
        subscription.closed = true;
        this._subscriptions.delete(subscription);
        const error = new GatewayError(frame.error, frame.message, frame);
        subscription._settle(error);
        if (typeof subscription._callbacks.onError === "function") subscription._call("onError", frame);
        else this._report(frame);
      }
      return;
    }
    if (frame.type === "error") entry.reject(new GatewayError(frame.error, frame.message, frame));
    else entry.resolve(frame);
  }

  _report(frame) {
    if (typeof this.options.onError === "function") this.options.onError(frame);
  }
}
