// Types of client.js (coap-ws-gateway's JavaScript client), for editors. docs/client.md
// explains the behaviour; docs/protocol.md the frames.

/** A decoded payload is carried in `value`; `payload_b64` and `decode_error` when it is not. */
export interface Payload {
  value?: unknown;
  payload_b64?: string;
  decode_error?: string;
}

export interface NotifyFrame extends Payload {
  type: "notify";
  sub: string;
  uri: string;
  seq: number;
  code: string;
  cf: number | null;
  ts: number;
  max_age: number;
  /** true on an update sent again after a reconnect (subscribe with `since`). */
  replay?: true;
  /** true on a `cond.pmax` repeat: the last frame again (same seq, ts and value). */
  repeat?: true;
  /** Why a conditional subscription's condition could not apply to this value (it is
   * delivered anyway). */
  cond_error?: string;
}

/** Conditional notification parameters (draft-ietf-core-conditional-attributes without
 * the `c.` prefix); docs/protocol.md has the rules. */
export interface Condition {
  /** Seconds at least between notifies; the newest qualifying value when the window ends. */
  pmin?: number;
  /** Seconds at most without a notify (at least the gateway's `[limits] min_pmax`). */
  pmax?: number;
  /** Notify when the value crosses this upper limit. */
  gt?: number;
  /** Notify when the value crosses this lower limit. */
  lt?: number;
  /** Notify when the value changed by at least this since the last notify. */
  st?: number;
  /** gt/lt make a band: notify while the value is in it. */
  band?: boolean;
  /** For a boolean: true, rising edges only; false, falling ones. */
  edge?: boolean;
  /** RFC 6901 JSON Pointer into the value (SenML packs: "/0/v"). */
  path?: string;
}

export interface StatusFrame {
  type: "status";
  sub: string;
  uri: string;
  state: "online" | "stale" | "offline";
  reason?: string;
  code?: string;
}

export interface SubscribedFrame {
  type: "subscribed";
  id: string;
  sub: string;
  uri: string;
  epoch?: string;
  recovered?: boolean;
}

export interface ResponseFrame extends Payload {
  type: "response";
  id: string;
  code: string;
  cf: number | null;
}

export interface ErrorFrame {
  type: "error";
  id: string | number | null;
  error: string;
  message: string;
  code?: string;
}

export interface Resource extends Payload {
  uri: string;
  name: string | null;
  observable: boolean | null;
  cf: number | null;
  rt: string | null;
  if: string | null;
  sub?: string;
  state?: "online" | "stale" | "offline" | null;
  last_update?: number | null;
  registrations?: number;
  subscribers?: number;
  notifications?: number;
  ts?: number;
}

/** Codes of the gateway (`bad_request`, `not_found`, `forbidden`, `timeout`,
 * `upstream_error`, `unsupported`, `limit`, `rate_limited`, `internal_error`) and of the
 * client: `disconnected` (the connection dropped while the request was in flight; it is not
 * sent again), `no_reply` (no reply within the request's timeout plus `requestMargin`),
 * `closed` (close() was called, or the subscription was unsubscribed). */
export class GatewayError extends Error {
  readonly code: string;
  /** The gateway's error frame; null when the client made the error up. */
  readonly frame: ErrorFrame | null;
  constructor(code: string, message: string, frame?: ErrorFrame | null);
}

export type ConnectionState = "connecting" | "open" | "waiting" | "closed";

export interface StateInfo {
  /** "connecting", "waiting": the attempt number (0: the first connection). */
  attempt?: number;
  /** "waiting": milliseconds until the next attempt. */
  delay?: number;
  /** "waiting": the WebSocket close code and reason, when the connection closed. */
  code?: number;
  reason?: string;
}

export interface ResyncEvent {
  /** Where the subscription was: its stream and the last seq delivered. */
  previous: { epoch: string | null; seq: number };
  /** The stream it continues in (differs after a gateway restart). */
  epoch: string | null;
  /** The `subscribed` frame that said `recovered: false` (or had no epoch). */
  frame: SubscribedFrame;
}

export interface SubscribeCallbacks {
  /** Each update once, in seq order, replayed ones (`replay: true`) like live ones. */
  onNotify?: (frame: NotifyFrame, subscription: Subscription) => void;
  onStatus?: (frame: StatusFrame, subscription: Subscription) => void;
  /** After a reconnect, when updates were missed and could not be replayed (the gateway
   * restarted, or its history no longer held them). The next onNotify is the latest value. */
  onResync?: (event: ResyncEvent, subscription: Subscription) => void;
  /** The gateway refused the subscription (it ends): not_found, forbidden, limit... */
  onError?: (frame: ErrorFrame, subscription: Subscription) => void;
}

export interface SubscribeOptions extends SubscribeCallbacks {
  /** Conditional notifications, sent again with the subscribe after each reconnect. */
  cond?: Condition;
  /** Ask for compact notifies (docs/protocol.md §18): after the first, the gateway leaves out
   * `uri`, `code`, `cf` and `max_age` while they do not change. onNotify still gets complete
   * frames (the client fills them in); only the wire carries fewer bytes. Sent again with
   * the subscribe after each reconnect. */
  compact?: boolean;
}

export interface Subscription {
  /** The name or URI given to subscribe(). */
  readonly target: string;
  /** Whether it asked for compact notifies. */
  readonly compact: boolean;
  /** The gateway's sub and normalized URI, once subscribed. */
  readonly sub: string | null;
  readonly uri: string | null;
  /** The stream and the last seq delivered to onNotify (0: none yet). */
  readonly epoch: string | null;
  readonly seq: number;
  readonly closed: boolean;
  /** The conditions it subscribes with, or null. */
  readonly cond: Condition | null;
  /** No callback runs after this returns. */
  unsubscribe(): void;
  /** The first `subscribed` frame, or a GatewayError if the gateway refused. */
  ready(): Promise<SubscribedFrame>;
}

export interface RequestOptions {
  value?: unknown;
  payload_b64?: string;
  cf?: number;
  accept?: number;
  /** Seconds the gateway waits for the sensor (default 10, at most 60). */
  timeout?: number;
  confirmable?: boolean;
}

export type Method = "GET" | "POST" | "PUT" | "DELETE" | "FETCH" | "PATCH" | "iPATCH";

export interface ClientOptions {
  /** Sent as `?access_token=` (browsers cannot set Authorization on a WebSocket). */
  token?: string;
  onState?: (state: ConnectionState, info: StateInfo) => void;
  /** Error frames that answer nothing the client sent (`id` null). */
  onError?: (frame: ErrorFrame) => void;
  /** ms before the first reconnect attempt (default 500); doubles per failed attempt. */
  backoffInitial?: number;
  /** ms, the longest wait between attempts (default 30000). */
  backoffMax?: number;
  /** ms added to a request's timeout before it fails with `no_reply` (default 5000). */
  requestMargin?: number;
  /** ms between protocol pings; with no frame for twice as long, reconnect (default 20000,
   * 0: off). */
  heartbeat?: number;
  /** A WebSocket constructor, where there is no global one. */
  WebSocket?: new (url: string) => WebSocket;
}

export class GatewayClient {
  /** `url`: the gateway's ws:// or wss:// /ws URL; in a browser, default the page's own. */
  constructor(url?: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  onState(listener: (state: ConnectionState, info: StateInfo) => void): () => void;
  subscribe(nameOrUri: string, options?: SubscribeOptions): Subscription;
  request(method: Method, nameOrUri: string, options?: RequestOptions): Promise<ResponseFrame>;
  list(): Promise<Resource[]>;
  close(): void;
}
