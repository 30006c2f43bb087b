#!/usr/bin/env node
// optreg over a slow link, from Node.js (docs/slow-links.md): gradients sent compressed
// (top-k: int32 indices + float64 values; int8 with a float32 scale per block), the
// error-feedback residual kept here, and replies as bf16 deltas (step_reply
// STEP_REPLY_BF16_DELTA) added to this client's copy. Every number is checked against
// SGD computed here on exactly what the contract says the server decodes.
//
//   node compressed.js [HOST:PORT]   (default: $OPTREG_ADDRESS, else 127.0.0.1:50051)
//
// Exit status: 0 when every check passes, 1 on a mismatch, 2 when a call fails.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const ADDRESS = process.argv[2] || process.env.OPTREG_ADDRESS || '127.0.0.1:50051';
const definition = protoLoader.loadSync(['optreg/v1/session.proto'], {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const sessions = new (grpc.loadPackageDefinition(definition).optreg.v1.SessionService)(
  ADDRESS, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    sessions[method](request, { deadline: Date.now() + 30000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

let failures = 0;
function check(ok, message) {
  if (!ok) { failures++; console.error(`MISMATCH ${message}`); }
  return ok;
}

const N = 12;
const LR = 0.5;
const init = Array.from({ length: N }, (_, i) => Math.cos(i + 0.5));
const gradient = (i, t) => Math.sin(1.3 * (i + 1) + 0.7 * t) * (1 + (i % 3));

function f64(values) {
  const b = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => b.writeDoubleLE(v, i * 8));
  return b;
}
function read(t) { // float64 parameters, or bfloat16 deltas (the upper half of a float32)
  const n = t.shape.reduce((a, b) => a * Number(b), 1);
  if (t.dtype === 'DATA_TYPE_FLOAT64') return Array.from({ length: n }, (_, i) => t.data.readDoubleLE(i * 8));
  const f = Buffer.alloc(4);
  return Array.from({ length: n }, (_, i) => { f.writeUInt32LE(t.data.readUInt16LE(i * 2) * 65536); return f.readFloatLE(0); });
}

// The encodings, each returning [the CompressedTensor, what the server decodes from it].
function topK(acc, k) {
  const idx = acc.map((v, i) => i).sort((a, b) => Math.abs(acc[b]) - Math.abs(acc[a])).slice(0, k).sort((a, b) => a - b);
  const indices = Buffer.alloc(k * 4);
  idx.forEach((v, j) => indices.writeInt32LE(v, j * 4));
  const decoded = new Array(acc.length).fill(0);
  idx.forEach((i) => { decoded[i] = acc[i]; });
  return [{ name: 'w', shape: [acc.length], top_k: { indices, dtype: 'DATA_TYPE_FLOAT64', values: f64(idx.map((i) => acc[i])) } }, decoded];
}
function int8Blocks(acc, block) {
  const blocks = Math.ceil(acc.length / block);
  const scales = Buffer.alloc(blocks * 4);
  const data = Buffer.alloc(acc.length);
  const decoded = new Array(acc.length);
  for (let b = 0; b < blocks; b++) {
    const part = acc.slice(b * block, (b + 1) * block);
    const scale = Math.fround(Math.max(...part.map(Math.abs)) / 127);
    scales.writeFloatLE(scale, b * 4);
    part.forEach((v, j) => {
      const i = b * block + j;
      const q = scale > 0 ? Math.max(-127, Math.min(127, Math.round(v / scale))) : 0;
      data.writeInt8(q, i);
      decoded[i] = Math.fround(q * scale); // the contract's float32 product
    });
  }
  return [{ name: 'w', shape: [acc.length], int8_blocks: { data, block, scales } }, decoded];
}

async function run(label, encode, stepReply) {
  const created = await call('CreateSession', {
    config: { optimizer: 'sgd', hyperparameters: { lr: LR }, master_dtype: 'DATA_TYPE_FLOAT64', step_reply: stepReply },
    parameters: [{ name: 'w', dtype: 'DATA_TYPE_FLOAT64', shape: [N], data: f64(init) }],
  });
  const id = created.session.session_id;
  const expected = init.slice(); // SGD on the decoded gradients
  const copy = init.slice(); // this client's parameters, from the replies
  let residual = new Array(N).fill(0);
  let bf16Replies = 0;
  try {
    for (let t = 0; t < 8; t++) {
      const acc = residual.map((r, i) => r + gradient(i, t));
      const [msg, decoded] = encode(acc);
      residual = acc.map((v, i) => v - decoded[i]); // error feedback: what this step left out
      const reply = await call('Step', { session_id: id, step: t, compressed: [msg] });
      decoded.forEach((g, i) => { expected[i] -= LR * g; });
      const got = read(reply.tensors[0]);
      if (reply.tensors[0].dtype === 'DATA_TYPE_BFLOAT16') { bf16Replies++; got.forEach((d, i) => { copy[i] += d; }); }
      else got.forEach((v, i) => { copy[i] = v; });
    }
    const master = read((await call('ReadParameters', { session_id: id, names: [] })).parameters[0]);
    master.forEach((v, i) => check(Math.abs(v - expected[i]) <= 1e-12 * Math.max(1, Math.abs(v)),
      `${label}: w[${i}] server ${v}, SGD on the decoded gradients ${expected[i]}`));
    const drift = Math.max(...master.map((v, i) => Math.abs(v - copy[i])));
    check(drift < 1e-2, `${label}: this client's copy is ${drift} from the master`);
    if (stepReply === 'STEP_REPLY_BF16_DELTA') check(bf16Replies === 7, `${label}: ${bf16Replies} bf16 replies of 8`);
    console.log(`${label.padEnd(28)} 8 steps, the server applied what it decoded; client copy within ${drift.toExponential(1)}`);
  } finally {
    await call('DeleteSession', { session_id: id });
  }
}

async function refused() {
  const created = await call('CreateSession', {
    config: { optimizer: 'sgd', master_dtype: 'DATA_TYPE_FLOAT64' },
    parameters: [{ name: 'w', dtype: 'DATA_TYPE_FLOAT64', shape: [N], data: f64(init) }],
  });
  const id = created.session.session_id;
  const indices = Buffer.alloc(4);
  indices.writeInt32LE(N, 0);
  try {
    await call('Step', { session_id: id, step: 0, compressed: [{ name: 'w', shape: [N], top_k: { indices, dtype: 'DATA_TYPE_FLOAT64', values: f64([1]) } }] });
    check(false, 'an index out of range was accepted');
  } catch (err) {
    check(err.code === grpc.status.INVALID_ARGUMENT && /compressed\[0\]\.top_k\.indices/.test(err.details),
      `an index out of range answered ${err.code} ${err.details}`);
  } finally {
    await call('DeleteSession', { session_id: id });
  }
  console.log('an index out of range: INVALID_ARGUMENT naming compressed[0].top_k.indices');
}

async function main() {
  console.log(`optreg at ${ADDRESS}; contract loaded from ${PROTO_ROOT}`);
  await run('top-k 3 of 12', (acc) => topK(acc, 3), 'STEP_REPLY_PARAMETERS');
  await run('int8, blocks of 5', (acc) => int8Blocks(acc, 5), 'STEP_REPLY_PARAMETERS');
  await run('top-k 3 of 12, bf16 replies', (acc) => topK(acc, 3), 'STEP_REPLY_BF16_DELTA');
  await refused();
  if (failures) { console.error(`${failures} check(s) failed`); process.exit(1); }
  console.log('all checks passed');
}

main().catch((err) => { console.error(`call failed: ${err.rpc || ''} ${err.code} ${err.details || err.message}`); process.exit(2); });
