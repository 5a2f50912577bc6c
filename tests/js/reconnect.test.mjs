// Reconnects: a cut TCP connection, a stalled one, a gateway restart; what subscriptions and
// requests see across them.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import {
  assertContiguous, closeControl, command, connect, env, follow, loadClient, within,
} from "./helpers.mjs";

const { GatewayClient } = await loadClient();
after(closeControl);

const opened = (states, count) =>
  states.next((_, all) => all.filter((s) => s.state === "open").length >= count, `open #${count}`);

test("across a cut connection every update arrives exactly once, the missed ones replayed", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.relayUrl);
  const { subscription, notifies, resyncs } = follow(client, "temperature");
  const reconnectedAt = [];  // how many notifies had come at each open
  client.onState((state) => { if (state === "open") reconnectedAt.push(notifies.items.length); });
  await notifies.next((_, all) => all.length >= 3, "three notifies");
  // Cut, and let three updates happen at the gateway before the relay lets the client in.
  const { severed, missed } = await command({ do: "cut", updates: 3 });
  assert.equal(severed, 1);
  await states.next((s) => s.state === "waiting", "the client to notice the cut");
  await opened(states, 2);
  const last = missed.at(-1);
  await notifies.next((f) => f.seq >= last + 3, "live updates after the replayed ones");
  const seqs = notifies.items.map((f) => f.seq);
  assertContiguous(seqs);
  // What happened while it was away came again as replays (not as a fresh start), then live.
  const before = notifies.items.slice(0, reconnectedAt[1]).map((f) => f.seq);
  const again = notifies.items.slice(reconnectedAt[1]);
  const owed = missed.filter((seq) => seq > before.at(-1));
  assert.ok(owed.length >= 1, `missed ${missed}, had ${before}`);
  assert.deepEqual(again.slice(0, owed.length).map((f) => [f.seq, f.replay]),
    owed.map((seq) => [seq, true]));
  assert.equal(resyncs.items.length, 0);
  assert.equal(subscription.seq, seqs.at(-1));
});

test("a request in flight when the connection drops is rejected, and not sent again", async (t) => {
  const sent = [];
  class Recording extends WebSocket {
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  const { client, states } = connect(t, GatewayClient, env.relayUrl, { WebSocket: Recording });
  await opened(states, 1);
  const inFlight = client.request("GET", env.silentUri, { timeout: 10 });
  const settled = inFlight.then(() => "resolved", (error) => error);
  await command({ do: "cut", updates: 0 });
  const refused = await within(settled, "the rejection");
  assert.equal(refused.code, "disconnected");
  assert.equal(refused.frame, null);
  // The client is back, and a new request goes through; the old one went out only once.
  await opened(states, 2);
  assert.equal((await client.request("GET", "led")).code, "2.05");
  const requests = sent.filter((f) => f.type === "request").map((f) => f.uri ?? f.name);
  assert.deepEqual(requests, [env.silentUri, "led"]);
});

test("a request with no reply at all rejects after its timeout and the margin", async (t) => {
  // No heartbeat: the stalled connection stays up, only the request's own clock runs.
  const { client, states } = connect(t, GatewayClient, env.relayUrl,
    { heartbeat: 0, requestMargin: 300 });
  await opened(states, 1);
  await command({ do: "stall" });
  const started = Date.now();
  const refused = await client.request("GET", "led", { timeout: 0.5 }).then(
    () => assert.fail("resolved"), (error) => error);
  assert.equal(refused.code, "no_reply");
  assert.ok(Date.now() - started >= 800, `${Date.now() - started} ms`);
  assert.equal(client.state, "open");
  await command({ do: "cut", updates: 0 });  // ends the stalled connection
});

test("a stalled connection is noticed by the heartbeat, and updates resume exactly once", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.relayUrl, { heartbeat: 200 });
  const { notifies, resyncs } = follow(client, "temperature");
  await notifies.next((_, all) => all.length >= 2, "two notifies");
  // Nothing closes: the client has only the silence to go by.
  await command({ do: "stall" });
  const dropped = await states.next((s) => s.state === "waiting", "the heartbeat to give up");
  assert.equal(dropped.reason, "no answer to the heartbeat");
  await opened(states, 2);
  const resumed = notifies.items.at(-1).seq;
  await notifies.next((f) => f.seq >= resumed + 3, "updates after the reconnect");
  assertContiguous(notifies.items.map((f) => f.seq));
  assert.equal(resyncs.items.length, 0);
  client.close();
  await command({ do: "cut", updates: 0 });  // ends the stalled connection
});

test("after a gateway restart the client comes back and says the stream started afresh", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.url);
  const { subscription, notifies, resyncs } = follow(client, "temperature");
  // Far enough along that the new gateway, numbering from 1, is well below it when the
  // client comes back (20 updates a second): its values must not pass for repeats.
  await notifies.next((f) => f.seq >= 40, "seq 40");
  const before = { epoch: subscription.epoch, seq: subscription.seq };
  await command({ do: "restart" });
  const gone = await states.next((s) => s.state === "waiting", "the restart to close us");
  assert.equal(gone.code, 1001);  // going away
  await opened(states, 2);
  // A new gateway numbers from 1 again: the client says so, and delivers the new values.
  const resync = await resyncs.next(() => true, "onResync");
  // Where the client's copy of the old stream ended: at or after the snapshot (updates
  // kept coming until the gateway closed), and one of the values it delivered.
  assert.equal(resync.previous.epoch, before.epoch);
  assert.ok(resync.previous.seq >= before.seq, `${resync.previous.seq} ${before.seq}`);
  assert.ok(notifies.items.some((f) => f.seq === resync.previous.seq));
  assert.notEqual(resync.epoch, before.epoch);
  assert.equal(resync.frame.recovered, false);
  const count = notifies.items.length;
  const fresh = await notifies.next((_, all) => all.length > count, "a notify of the new gateway");
  assert.equal(fresh.replay, undefined);
  assert.ok(fresh.seq < before.seq, `${fresh.seq} ${before.seq}`);
  assert.equal(subscription.epoch, resync.epoch);
  await notifies.next((_, all) => all.length > count + 2, "more of them");
  assertContiguous(notifies.items.slice(count).map((f) => f.seq));
  // Requests work on the new gateway too.
  assert.equal((await client.request("GET", "led")).code, "2.05");
});

test("a conditional subscription subscribes with its cond again after a reconnect", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.relayUrl);
  // The LED changes only when told to: all that comes is its value, then pmax repeats.
  const { notifies, resyncs } = follow(client, "led", { cond: { pmax: 1, edge: true, path: "/on" } });
  const repeat = await notifies.next((f) => f.repeat === true, "a pmax repeat");
  // A repeat has the seq already delivered, and is delivered all the same.
  assert.deepEqual(notifies.items.map((f) => [f.seq, f.repeat]),
    [[repeat.seq, undefined], [repeat.seq, true]]);
  await command({ do: "cut" });
  await opened(states, 2);
  // Not replayed (a filtered stream has no gapless resume): onResync.
  await resyncs.next(() => true, "onResync");
  const from = notifies.items.length;
  // Only the cond sent again can bring repeats now.
  const again = await notifies.next((f, all) => all.length > from && f.repeat === true,
    "a repeat after the reconnect");
  assert.equal(again.seq, repeat.seq);
});
