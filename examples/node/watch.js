#!/usr/bin/env node
// Watch a session's training telemetry live (TelemetryService.WatchSession) and print, per step,
// the loss the client reported and each tensor's update/param ratio against the healthy band
// (about 1e-3; below 1e-4 the learning rate is likely too low, above 1e-2 too high).
//
//   node watch.js SESSION_ID [--address HOST:PORT] [--from STEP] [--steps N] [--token TOKEN]
//
// --from resumes from a step (the stream sends every step from there on, without gaps); --steps
// stops after N steps (default: watch until interrupted). Exit status 2 when a call fails.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

function parseArgs(argv) {
  const opts = { address: process.env.OPTREG_ADDRESS || '127.0.0.1:50051', from: 0, steps: 0,
                 token: process.env.OPTREG_TOKEN || '' };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--address') opts.address = argv[++i];
    else if (a === '--from') opts.from = Number(argv[++i]);
    else if (a === '--steps') opts.steps = Number(argv[++i]);
    else if (a === '--token') opts.token = argv[++i];
    else rest.push(a);
  }
  if (rest.length !== 1) {
    console.error('usage: node watch.js SESSION_ID [--address HOST:PORT] [--from STEP] [--steps N] [--token TOKEN]');
    process.exit(2);
  }
  opts.sessionId = rest[0];
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const definition = protoLoader.loadSync(['optreg/v1/telemetry.proto'], {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const optreg = grpc.loadPackageDefinition(definition).optreg.v1;
const client = new optreg.TelemetryService(opts.address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (opts.token) metadata.set('authorization', `Bearer ${opts.token}`);

function band(ratio) {
  if (ratio < 1e-4) return 'LOW ';
  if (ratio > 1e-2) return 'HIGH';
  return 'ok  ';
}

let seen = 0;
const call = client.WatchSession({ session_id: opts.sessionId, from_step: opts.from }, metadata);
call.on('data', (msg) => {
  if (msg.event === 'alert') {
    const a = msg.alert;
    console.log(`alert step ${a.step} ${a.kind}${a.tensor ? ' ' + a.tensor : ''}: ${a.message}`);
    return;
  }
  const s = msg.step;
  const loss = 'loss' in s.metrics ? ` loss ${s.metrics.loss.toPrecision(4)}` : '';
  const ratios = s.tensors.map((t) => `${t.name} ${t.update_ratio.toExponential(2)} ${band(t.update_ratio)}`);
  console.log(`step ${s.step}${s.steps > 1 ? ` (${s.steps} steps)` : ''}${loss}  update/param: ${ratios.join('  ')}`);
  seen += 1;
  if (opts.steps && seen >= opts.steps) {
    call.cancel();
  }
});
call.on('error', (err) => {
  if (err.code === grpc.status.CANCELLED) process.exit(0);
  console.error(`WatchSession failed: ${err.code} ${err.details || err.message}`);
  process.exit(2);
});
call.on('end', () => process.exit(0));
