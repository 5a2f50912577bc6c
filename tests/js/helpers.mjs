// What the node tests share: the module as the gateway serves it, the control connection to
// the pytest side (tests/test_client_js.py), and waiting on events with a deadline.
import assert from "node:assert/strict";
import net from "node:net";

export const env = {
  url: process.env.GATEWAY_URL,         // the gateway itself
  relayUrl: process.env.RELAY_URL,      // through the relay pytest can cut or stall
  http: process.env.GATEWAY_HTTP,
  token: process.env.GATEWAY_TOKEN,
  silentUri: process.env.SILENT_URI,    // a CoAP endpoint that never answers
};
for (const [key, value] of Object.entries(env)) {
  if (!value) throw new Error(`${key} is not set: run these through tests/test_client_js.py`);
}

/** Generous: a wait that fails is a bug, not a slow machine. */
export const WAIT = 15000;

/** The client module exactly as GET /client.js serves it (imported from its bytes). */
export async function loadClient() {
  const response = await fetch(`${env.http}/client.js`);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "text/javascript; charset=utf-8");
  const source = await response.text();
  return import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);
}

let control = null;

/** Ask the pytest side to do something ({do: "cut"|"stall"|"restart", ...}); resolves with
 * its answer once it is done. */
export function command(request) {
  if (control === null) {
    const socket = net.connect(Number(process.env.CONTROL_PORT), "127.0.0.1");
    socket.setEncoding("utf8");
    const waiting = [];
    let buffered = "";
    socket.on("data", (chunk) => {
      buffered += chunk;
      let end;
      while ((end = buffered.indexOf("\n")) >= 0) {
        waiting.shift().resolve(JSON.parse(buffered.slice(0, end)));
        buffered = buffered.slice(end + 1);
      }
    });
    socket.on("error", (error) => { for (const w of waiting.splice(0)) w.reject(error); });
    control = { socket, waiting };
  }
  return within(new Promise((resolve, reject) => {
    control.waiting.push({ resolve, reject });
    control.socket.write(JSON.stringify(request) + "\n");
  }), `the pytest side to ${request.do}`);
}

/** Close the control connection (the node process ends when nothing is left open). */
export function closeControl() {
  control?.socket.end();
  control = null;
}

export function within(promise, what, ms = WAIT) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`waited ${ms} ms for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/** Collects events (notifies, states...) and waits for one that matches. */
export class Inbox {
  constructor() {
    this.items = [];
    this._waiters = [];
  }

  push(item) {
    this.items.push(item);
    for (const waiter of [...this._waiters]) {
      if (waiter.predicate(item, this.items)) {
        this._waiters.splice(this._waiters.indexOf(waiter), 1);
        waiter.resolve(item);
      }
    }
  }

  /** The first item for which predicate(item, items up to it) holds, kept or to come. */
  next(predicate, what) {
    const found = this.items.find((item, index) => predicate(item, this.items.slice(0, index + 1)));
    if (found !== undefined) return Promise.resolve(found);
    return within(new Promise((resolve) => this._waiters.push({ predicate, resolve })), what);
  }
}

/** A client whose events all land in inboxes; closed when the test ends. */
export function connect(t, GatewayClient, url, options = {}) {
  const states = new Inbox();
  const client = new GatewayClient(url, {
    token: env.token, backoffInitial: 50, backoffMax: 400,
    onState: (state, info) => states.push({ state, ...info }),
    ...options,
  });
  t.after(() => client.close());
  return { client, states };
}

export function follow(client, nameOrUri, options = {}) {
  const notifies = new Inbox();
  const statuses = new Inbox();
  const resyncs = new Inbox();
  const errors = new Inbox();
  const subscription = client.subscribe(nameOrUri, {
    onNotify: (frame) => notifies.push(frame),
    onStatus: (frame) => statuses.push(frame),
    onResync: (event) => resyncs.push(event),
    onError: (frame) => errors.push(frame),
    ...options,
  });
  return { subscription, notifies, statuses, resyncs, errors };
}

/** Whether `seqs` go up by exactly one each time: no gap, no repeat. */
export function assertContiguous(seqs) {
  const expected = seqs.map((_, index) => seqs[0] + index);
  assert.deepEqual(seqs, expected, `seqs with a gap or a repeat: ${seqs}`);
}
