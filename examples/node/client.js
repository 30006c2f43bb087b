#!/usr/bin/env node
// optreg from Node.js: the contract is loaded at run time from ../../proto (no
// generated code), the tensors are raw little-endian float64 bytes, and every
// number the server returns is checked against the book's formulas computed
// here in JavaScript.
//
//   node client.js [HOST:PORT]      (default: $OPTREG_ADDRESS, else 127.0.0.1:50051)
//
// Exit status: 0 when every check passes, 1 on a numeric mismatch or a failed
// check, 2 when the server cannot be reached or a call fails.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const ADDRESS = process.argv[2] || process.env.OPTREG_ADDRESS || '127.0.0.1:50051';
const DEADLINE_MS = 30000;
// The server computes in float64 as we do; allow rounding differences of a few ulps.
const RTOL = 1e-12;

const definition = protoLoader.loadSync(['optreg/v1/registry.proto', 'optreg/v1/session.proto'], {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const optreg = grpc.loadPackageDefinition(definition).optreg.v1;

const credentials = grpc.credentials.createInsecure();
const registry = new optreg.OptimizerRegistryService(ADDRESS, credentials);
const sessions = new optreg.SessionService(ADDRESS, credentials);

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, reply) => {
      if (err) {
        err.rpc = method;
        reject(err);
      } else {
        resolve(reply);
      }
    });
  });
}

// --- tensors: name, dtype, shape, raw little-endian C-order bytes ---------------

function tensor(name, shape, values) {
  const data = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => data.writeDoubleLE(v, i * 8));
  return { name, dtype: 'DATA_TYPE_FLOAT64', shape, data };
}

function values(t) {
  if (t.dtype !== 'DATA_TYPE_FLOAT64') throw new Error(`tensor ${t.name}: dtype ${t.dtype}, expected DATA_TYPE_FLOAT64`);
  const n = t.shape.reduce((a, b) => a * Number(b), 1);
  if (t.data.length !== n * 8) throw new Error(`tensor ${t.name}: ${t.data.length} bytes for shape [${t.shape}]`);
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = t.data.readDoubleLE(i * 8);
  return out;
}

// --- the book's formulas (chapter 6, common/optimizer.py) ------------------------

const BOOK_EPS = 1e-7;

const reference = {
  sgd: {
    init: () => ({}),
    update(p, g, _state, _t, hp) {
      for (let i = 0; i < p.length; i++) p[i] -= hp.lr * g[i];
    },
  },
  adam: {
    init: (n) => ({ m: new Array(n).fill(0), v: new Array(n).fill(0) }),
    update(p, g, s, t, hp) {
      const lrT = (hp.lr * Math.sqrt(1.0 - Math.pow(hp.beta2, t))) / (1.0 - Math.pow(hp.beta1, t));
      for (let i = 0; i < p.length; i++) {
        s.m[i] += (1 - hp.beta1) * (g[i] - s.m[i]);
        s.v[i] += (1 - hp.beta2) * (g[i] * g[i] - s.v[i]);
        p[i] -= (lrT * s.m[i]) / (Math.sqrt(s.v[i]) + BOOK_EPS);
      }
    },
  },
};

// --- checks ----------------------------------------------------------------------

let failures = 0;

function check(ok, message) {
  if (!ok) {
    failures++;
    console.error(`MISMATCH ${message}`);
  }
  return ok;
}

function compare(label, got, want) {
  if (!check(got.length === want.length, `${label}: ${got.length} values, expected ${want.length}`)) return 0;
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    const err = Math.abs(got[i] - want[i]);
    const tol = RTOL * Math.max(1, Math.abs(want[i]));
    if (!(err <= tol)) {
      check(false, `${label}[${i}]: server ${got[i]}, book formula ${want[i]} (|diff| ${err})`);
      return err;
    }
    worst = Math.max(worst, err);
  }
  return worst;
}

// A deterministic gradient for parameter `k`, element i, step t: varied signs and
// magnitudes, some tiny (where the book's Adam differs from torch's).
function gradient(k, i, t) {
  const g = Math.sin(1.7 * (i + 1) + 0.9 * t + k) * Math.pow(10, -((i + t) % 4));
  return i === 2 && k === 0 ? 1e-6 : g;
}

const PARAMS = [
  { name: 'W', shape: [2, 3], init: [0.5, -1.25, 2.0, 3.5, -0.75, 0.1] },
  { name: 'b', shape: [3], init: [0.0, 1.0, -2.0] },
];

async function runOptimizer(info, hyperparameters, steps) {
  const name = info.name;
  const hp = {};
  for (const h of info.hyperparameters) hp[h.name] = h.default; // discovered defaults
  Object.assign(hp, hyperparameters);

  const created = await call(sessions, 'CreateSession', {
    config: {
      optimizer: name,
      hyperparameters,
      master_dtype: 'DATA_TYPE_FLOAT64',
      step_reply: 'STEP_REPLY_PARAMETERS',
    },
    parameters: PARAMS.map((p) => tensor(p.name, p.shape, p.init)),
  });
  const session = created.session;
  check(session.optimizer === name, `${name}: session optimizer is ${session.optimizer}`);
  check(Number(session.step) === 0, `${name}: new session at step ${session.step}`);
  for (const [k, v] of Object.entries(hp)) {
    check(session.hyperparameters[k] === v, `${name}: hyperparameter ${k} is ${session.hyperparameters[k]}, expected ${v}`);
  }

  const ref = reference[name];
  const expected = PARAMS.map((p) => p.init.slice());
  const state = PARAMS.map((p) => ref.init(p.init.length));
  let worst = 0;
  try {
    for (let t = 1; t <= steps; t++) {
      const grads = PARAMS.map((p, k) => p.init.map((_, i) => gradient(k, i, t)));
      const reply = await call(sessions, 'Step', {
        session_id: session.session_id,
        step: t - 1, // fencing: the step we believe the session is at
        gradients: PARAMS.map((p, k) => tensor(p.name, p.shape, grads[k])),
      });
      check(Number(reply.step) === t, `${name}: step reply ${reply.step}, expected ${t}`);
      check(!reply.replayed, `${name}: step ${t} answered as a replay`);
      PARAMS.forEach((p, k) => ref.update(expected[k], grads[k], state[k], t, hp));
      const byName = Object.fromEntries(reply.tensors.map((x) => [x.name, x]));
      PARAMS.forEach((p, k) => {
        const got = byName[p.name];
        if (!check(got !== undefined, `${name}: step ${t} reply lacks ${p.name}`)) return;
        check(got.shape.map(Number).join(',') === p.shape.join(','), `${name}: ${p.name} shape [${got.shape}]`);
        worst = Math.max(worst, compare(`${name} step ${t} ${p.name}`, values(got), expected[k]));
      });
    }
    // The master copy on the server, read back separately, must agree too.
    const read = await call(sessions, 'ReadParameters', { session_id: session.session_id, names: [] });
    check(Number(read.step) === steps, `${name}: ReadParameters at step ${read.step}, expected ${steps}`);
    for (const x of read.parameters) {
      const k = PARAMS.findIndex((p) => p.name === x.name);
      if (check(k >= 0, `${name}: unknown parameter ${x.name}`)) {
        compare(`${name} ReadParameters ${x.name}`, values(x), expected[k]);
      }
    }
  } finally {
    await call(sessions, 'DeleteSession', { session_id: session.session_id });
  }
  const moved = expected.map((e, k) => Math.max(...e.map((v, i) => Math.abs(v - PARAMS[k].init[i]))));
  check(Math.max(...moved) > 0, `${name}: parameters did not move`);
  console.log(`${name.padEnd(5)} ${steps} steps  hyperparameters ${JSON.stringify(hp)}  ` +
    `max |server - book formula| = ${worst.toExponential(2)}`);
}

// --- several workers on one session (docs/workers.md) ------------------------------

// Two workers of one sync session: "node-a" alone closes round 0 (it is the only member);
// "node-b" joins mid-run, and round 1 applies the mean of both contributions, the same
// reply going to each.
async function runWorkers() {
  const lr = 0.5;
  const init = [1.0, -2.0, 3.0];
  const created = await call(sessions, 'CreateSession', {
    config: {
      optimizer: 'sgd',
      hyperparameters: { lr },
      master_dtype: 'DATA_TYPE_FLOAT64',
      durability: 'DURABILITY_NONE',
      workers: { workers: 2, mode: 'WORKER_MODE_SYNC', round_deadline_seconds: 30 },
    },
    parameters: [tensor('w', [3], init)],
  });
  const id = created.session.session_id;
  const contribute = (worker, round, g) =>
    call(sessions, 'Step', { session_id: id, worker, round, gradients: [tensor('w', [3], g)] });
  try {
    const expected = init.slice();
    const a = await call(sessions, 'JoinSession', { session_id: id, worker: 'node-a' });
    check(Number(a.round) === 0, `workers: node-a joined at round ${a.round}, expected 0`);
    const g0 = [1, 2, 3];
    const r0 = await contribute('node-a', 0, g0);
    g0.forEach((g, i) => { expected[i] -= lr * g; });
    check(r0.contributors.join(',') === 'node-a', `workers: round 0 contributors ${r0.contributors}`);
    compare('workers round 0', values(r0.tensors[0]), expected);

    const b = await call(sessions, 'JoinSession', { session_id: id, worker: 'node-b' }); // a second worker joins
    check(Number(b.round) === 1, `workers: node-b joined at round ${b.round}, expected 1`);
    const ga = [0.5, -1, 4];
    const gb = [1.5, 3, -2];
    const [ra, rb] = await Promise.all([contribute('node-a', 1, ga), contribute('node-b', 1, gb)]);
    ga.forEach((g, i) => { expected[i] -= lr * ((g + gb[i]) / 2); });
    for (const [who, r] of [['node-a', ra], ['node-b', rb]]) {
      check(Number(r.step) === 2 && Number(r.round) === 1, `workers: ${who} got step ${r.step} round ${r.round}`);
      check(r.contributors.join(',') === 'node-a,node-b', `workers: ${who} saw contributors ${r.contributors}`);
      compare(`workers round 1 (${who})`, values(r.tensors[0]), expected);
    }
    try {
      await contribute('node-b', 0, gb); // round 0 closed without node-b: refused, naming the open round
      check(false, 'workers: a stale contribution was accepted');
    } catch (err) {
      check(err.code === grpc.status.FAILED_PRECONDITION && /open round is 2/.test(err.details),
        `workers: stale contribution answered ${err.code} ${err.details}`);
    }
    const info = (await call(sessions, 'GetSession', { session_id: id })).session;
    check(info.members.map((m) => m.worker).join(',') === 'node-a,node-b', `workers: members ${info.members}`);
    for (const worker of ['node-a', 'node-b']) await call(sessions, 'LeaveSession', { session_id: id, worker });
    console.log('workers 2 joined one sync session; round 1 applied the mean of both, the same reply to each');
  } finally {
    await call(sessions, 'DeleteSession', { session_id: id });
  }
}

async function main() {
  console.log(`optreg at ${ADDRESS}; contract loaded from ${PROTO_ROOT}`);
  const listing = await call(registry, 'ListOptimizers', {});
  const byName = Object.fromEntries(listing.optimizers.map((o) => [o.name, o]));
  for (const o of listing.optimizers) {
    const hps = o.hyperparameters.map((h) => `${h.name}=${h.default}`).join(', ');
    console.log(`  ${o.name.padEnd(10)} ${hps}`);
  }
  for (const f of listing.failures) console.log(`  plugin ${f.plugin} failed: ${f.reason}`);
  for (const want of ['sgd', 'adam']) {
    if (!check(want in byName, `the server does not list ${want}`)) return;
  }

  await runOptimizer(byName.sgd, { lr: 0.1 }, 5);
  await runOptimizer(byName.adam, { lr: 0.01 }, 8);
  await runWorkers();
}

main()
  .then(() => {
    registry.close();
    sessions.close();
    if (failures) {
      console.error(`${failures} check(s) failed`);
      process.exit(1);
    }
    console.log('all checks passed');
  })
  .catch((err) => {
    console.error(`error${err.rpc ? ` in ${err.rpc}` : ''}: ${err.message}`);
    process.exit(2);
  });
