// The gateway keeps two updates of history per resource here: a client away for longer is
// told that it missed updates, and goes on with the latest value.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { closeControl, command, connect, env, follow, loadClient } from "./helpers.mjs";

const { GatewayClient } = await loadClient();
after(closeControl);

test("when the history overflowed, onResync says so and the latest value follows", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.relayUrl);
  const { subscription, notifies, resyncs } = follow(client, "temperature");
  await notifies.next((_, all) => all.length >= 2, "two notifies");
  const { missed } = await command({ do: "cut", updates: 5 });
  await states.next((_, all) => all.filter((s) => s.state === "open").length >= 2, "reopen");
  const resync = await resyncs.next(() => true, "onResync");
  const latest = await notifies.next((f) => f.seq > resync.previous.seq, "the latest value");
  // Same gateway, same stream: not recovered because the history no longer reaches back.
  assert.equal(resync.frame.recovered, false);
  assert.equal(resync.epoch, resync.previous.epoch);
  assert.ok(resync.previous.seq < missed[0], `${resync.previous.seq} ${missed}`);
  assert.equal(latest.replay, undefined);
  assert.ok(latest.seq >= missed.at(-1), `${latest.seq} ${missed}`);
  // Never a repeat, and the gap is where the resync said it would be.
  const seqs = notifies.items.map((f) => f.seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b));
  const index = notifies.items.indexOf(latest);
  assert.equal(notifies.items[index - 1].seq, resync.previous.seq);
  assert.ok(latest.seq > resync.previous.seq + 2, "history of 2 would have covered it");
  assert.equal(subscription.epoch, resync.epoch);
});
