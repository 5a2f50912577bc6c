// The client's calls against a real gateway: requests, errors, list, subscriptions, tokens.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { closeControl, connect, env, follow, loadClient, within } from "./helpers.mjs";

const { GatewayClient, GatewayError } = await loadClient();
after(closeControl);

test("a request resolves with the response frame", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const put = await client.request("PUT", "led", { value: { on: true } });
  assert.equal(put.type, "response");
  assert.equal(put.code, "2.04");
  const get = await client.request("GET", "led");
  assert.deepEqual(get.value, { on: true });
  // A URI works where a name does.
  const uri = (await client.list()).find((r) => r.name === "led").uri;
  const again = await client.request("GET", uri, { accept: 60 });
  assert.deepEqual(again.value, { on: true });
});

test("a refused request rejects with the error frame", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const refused = await client.request("GET", "no/such/sensor").then(
    () => assert.fail("resolved"), (error) => error);
  assert.ok(refused instanceof GatewayError);
  assert.equal(refused.code, "not_found");
  assert.equal(refused.frame.type, "error");
  assert.equal(refused.frame.error, "not_found");
});

test("a request the sensor never answers rejects with the gateway's timeout", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const started = Date.now();
  const refused = await client.request("GET", env.silentUri, { timeout: 0.3 }).then(
    () => assert.fail("resolved"), (error) => error);
  assert.equal(refused.code, "timeout");
  assert.equal(refused.frame.error, "timeout");
  assert.ok(Date.now() - started >= 300);
});

test("list resolves with the resources", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const names = (await client.list()).map((r) => r.name);
  for (const name of ["temperature", "humidity", "status", "led"]) assert.ok(names.includes(name), name);
});

test("a subscription delivers notifies in seq order until unsubscribed", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const { subscription, notifies } = follow(client, "temperature");
  const subscribed = await within(subscription.ready(), "subscribed");
  assert.equal(subscribed.type, "subscribed");
  assert.ok(subscribed.epoch);
  await notifies.next((_, all) => all.length >= 4, "four notifies");
  const seqs = notifies.items.map((f) => f.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
  assert.equal(new Set(seqs).size, seqs.length);
  assert.equal(subscription.seq, seqs.at(-1));
  assert.ok(notifies.items.every((f) => f.sub === subscribed.sub && typeof f.value === "number"));
  subscription.unsubscribe();
  const count = notifies.items.length;
  // After unsubscribe() returns no callback runs: a round trip later, nothing was added.
  await client.request("GET", "led");
  await client.list();
  assert.equal(notifies.items.length, count);
  assert.equal(subscription.closed, true);
});

test("two subscriptions of one resource: each sees every update once, each ends alone", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const first = follow(client, "humidity");
  await within(first.subscription.ready(), "subscribed");
  await first.notifies.next(() => true, "a notify");
  const second = follow(client, "humidity");
  await within(second.subscription.ready(), "subscribed");
  await second.notifies.next((_, all) => all.length >= 3, "three notifies");
  first.subscription.unsubscribe();
  const seen = second.notifies.items.length;
  await second.notifies.next((_, all) => all.length >= seen + 2, "notifies after the other ended");
  for (const { notifies } of [first, second]) {
    const seqs = notifies.items.map((f) => f.seq);
    assert.equal(new Set(seqs).size, seqs.length, `a repeat in ${seqs}`);
  }
});

test("a compact subscription: compact frames on the wire, complete ones in onNotify", async (t) => {
  const wire = [];
  class Spying extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (event) => wire.push(JSON.parse(event.data)));
    }
  }
  const { client } = connect(t, GatewayClient, env.url, { WebSocket: Spying });
  const notifies = [];
  const subscription = client.subscribe("temperature", {
    onNotify: (f) => notifies.push(f), compact: true,
  });
  assert.equal(subscription.compact, true);
  await within(subscription.ready(), "subscribed");
  await within(new Promise((resolve) => {
    const poll = setInterval(() => {
      if (notifies.length >= 4) { clearInterval(poll); resolve(); }
    }, 20);
  }), "four notifies");
  const sent = wire.filter((f) => f.type === "notify" && f.sub === subscription.sub);
  assert.ok("uri" in sent[0], "the first notify is complete");
  assert.ok(sent.slice(1).some((f) => !("uri" in f) && !("cf" in f)), "later ones are compact");
  for (const frame of notifies) {
    assert.equal(frame.uri, subscription.uri);
    assert.equal(frame.cf, 60);
    assert.equal(frame.code, "2.05");
    assert.equal(typeof frame.max_age, "number");
    assert.equal(typeof frame.value, "number");
  }
});

test("a refused subscription calls onError and its ready() rejects", async (t) => {
  const { client } = connect(t, GatewayClient, env.url);
  const { subscription, errors } = follow(client, "no/such/sensor");
  const refused = await subscription.ready().then(() => assert.fail("resolved"), (e) => e);
  assert.equal(refused.code, "not_found");
  assert.equal((await errors.next(() => true, "onError")).error, "not_found");
  assert.equal(subscription.closed, true);
});

test("without the token the connection never opens, and the client keeps trying", async (t) => {
  const { client, states } = connect(t, GatewayClient, env.url, { token: undefined });
  await states.next((s, all) => all.filter((x) => x.state === "waiting").length >= 2,
    "two failed attempts");
  assert.ok(!states.items.some((s) => s.state === "open"));
  const pending = client.request("GET", "led");
  client.close();
  // A request that never left is rejected when the client closes; nothing sent it.
  const refused = await pending.then(() => assert.fail("resolved"), (e) => e);
  assert.equal(refused.code, "closed");
  assert.equal(client.state, "closed");
});
