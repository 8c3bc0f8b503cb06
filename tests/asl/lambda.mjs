// A minimal AWS Lambda Runtime API host: runs a real Lambda binary (built with lambda_runtime)
// as one warm "container" and serves it invocations, the way Lambda does.
//
// Why not cargo-lambda's emulator: this host sends a real epoch deadline
// (Lambda-Runtime-Deadline-Ms), so the binaries' time budget is exercised as in AWS (the
// emulator sends a duration); each function gets its own environment (`_HANDLER`, settings)
// and keeps its process between invocations, like a warm container; nothing is built on the
// first invoke, and no extra tool is needed besides Node.
//
// A function error is re-thrown as an Error whose `name` is the Lambda `errorType`, which is
// what aws-local-stepfunctions' Retry and Catch match on.

import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { openSync, closeSync } from 'node:fs';
import http from 'node:http';

const API = '/2018-06-01/runtime';

export class LambdaFunction {
  /**
   * @param {object} o
   * @param {string} o.name function name (logs, ARN)
   * @param {string} o.binary path of the bootstrap binary
   * @param {Record<string,string>} o.env the function's environment variables
   * @param {string} o.logFile where the process's stdout and stderr go
   * @param {number} [o.timeoutMs] the function timeout (deadline sent with each invocation)
   */
  constructor({ name, binary, env, logFile, timeoutMs = 120_000 }) {
    Object.assign(this, { name, binary, env, logFile, timeoutMs });
    this.queue = [];
    this.waiting = null;
    this.inflight = new Map();
    this.invocations = [];
    this.initError = null;
  }

  async start() {
    this.server = http.createServer((req, res) => this.#route(req, res));
    // /next is a long poll: never time it out.
    this.server.requestTimeout = 0;
    this.server.headersTimeout = 0;
    this.server.keepAliveTimeout = 3_600_000;
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    const { port } = this.server.address();
    const log = openSync(this.logFile, 'a');
    this.proc = spawn(this.binary, [], {
      env: {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        HOME: process.env.HOME ?? '/tmp',
        AWS_LAMBDA_RUNTIME_API: `127.0.0.1:${port}`,
        AWS_LAMBDA_FUNCTION_NAME: this.name,
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE: '1024',
        AWS_LAMBDA_FUNCTION_VERSION: '$LATEST',
        AWS_LAMBDA_LOG_GROUP_NAME: `/aws/lambda/${this.name}`,
        AWS_LAMBDA_LOG_STREAM_NAME: 'local',
        ...this.env,
      },
      stdio: ['ignore', log, log],
    });
    closeSync(log);
    this.proc.on('error', (e) => {
      this.exited = { error: e.message };
      for (const [, call] of this.inflight) call.reject(named('Lambda.Unknown', `${this.name}: ${e.message}`));
      this.inflight.clear();
    });
    this.proc.on('exit', (code, signal) => {
      this.exited = { code, signal };
      for (const [, call] of this.inflight) {
        call.reject(named('Lambda.Unknown', `${this.name} exited (${code ?? signal}) mid-invocation`));
      }
      this.inflight.clear();
    });
  }

  /** Invokes the function; resolves with its result or rejects with a named Error. */
  invoke(payload) {
    if (this.exited) {
      return Promise.reject(named('Lambda.Unknown', `${this.name} is not running (${JSON.stringify(this.exited)})`));
    }
    return new Promise((resolve, reject) => {
      const id = randomUUID();
      const record = { id, input: payload, started: Date.now() };
      this.invocations.push(record);
      const timer = setTimeout(() => {
        this.inflight.delete(id);
        record.error = 'Sandbox.Timedout';
        reject(named('Sandbox.Timedout', `${this.name} timed out after ${this.timeoutMs} ms`));
      }, this.timeoutMs + 5_000);
      this.inflight.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          record.output = v;
          record.ms = Date.now() - record.started;
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          record.error = e.name;
          record.message = e.message;
          record.ms = Date.now() - record.started;
          reject(e);
        },
      });
      const item = { id, payload, deadline: Date.now() + this.timeoutMs };
      if (this.waiting) {
        const res = this.waiting;
        this.waiting = null;
        this.#dispatch(res, item);
      } else {
        this.queue.push(item);
      }
    });
  }

  #dispatch(res, item) {
    res.writeHead(200, {
      'content-type': 'application/json',
      'lambda-runtime-aws-request-id': item.id,
      'lambda-runtime-deadline-ms': String(item.deadline),
      'lambda-runtime-invoked-function-arn': `arn:aws:lambda:us-east-1:000000000000:function:${this.name}`,
      'lambda-runtime-trace-id': `Root=1-00000000-${item.id.replaceAll('-', '').slice(0, 24)}`,
    });
    res.end(JSON.stringify(item.payload ?? null));
  }

  #route(req, res) {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const url = req.url ?? '';
      if (req.method === 'GET' && url === `${API}/invocation/next`) {
        const item = this.queue.shift();
        if (item) this.#dispatch(res, item);
        else this.waiting = res;
        return;
      }
      const m = url.match(/^\/2018-06-01\/runtime\/invocation\/([^/]+)\/(response|error)$/);
      if (req.method === 'POST' && m) {
        const call = this.inflight.get(m[1]);
        this.inflight.delete(m[1]);
        res.writeHead(202).end();
        if (!call) return;
        if (m[2] === 'response') {
          try {
            call.resolve(JSON.parse(body));
          } catch (e) {
            call.reject(named('Lambda.Unknown', `unparsable response: ${e.message}`));
          }
        } else {
          let err = { errorType: 'Lambda.Unknown', errorMessage: body };
          try {
            err = JSON.parse(body);
          } catch {
            // keep the raw text
          }
          call.reject(named(err.errorType, err.errorMessage));
        }
        return;
      }
      if (req.method === 'POST' && url === `${API}/init/error`) {
        this.initError = body;
        res.writeHead(202).end();
        return;
      }
      res.writeHead(404).end();
    });
  }

  async stop() {
    if (this.proc && !this.exited) {
      const gone = new Promise((resolve) => this.proc.once('exit', resolve));
      this.proc.kill('SIGTERM');
      await Promise.race([gone, new Promise((r) => setTimeout(r, 2_000))]);
      if (!this.exited) this.proc.kill('SIGKILL');
    }
    if (this.waiting) this.waiting.destroy();
    this.server?.closeAllConnections();
    await new Promise((resolve) => this.server?.close(resolve) ?? resolve());
  }
}

/** An Error whose `name` is a Lambda errorType. */
export function named(name, message) {
  const e = new Error(message ?? name);
  e.name = name;
  return e;
}
