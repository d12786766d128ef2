// {{name}}: an event-host handler. The host calls `manifest` once when the
// file is loaded (what to consume, what it may publish to) and `handle` once
// per event. `wit/handler.wit` is the whole contract: records are objects
// with camelCase fields, enums are strings, a thrown {tag, val} is the
// handle-error.

import { open } from 'wasi:keyvalue/store@0.2.0-draft2';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft2';
import { log } from 'wasi:logging/logging@0.1.0-draft';

export function manifest() {
  return {
    name: '{{name}}',
    version: '0.1.0',
    subscriptions: [
      { exchange: '{{exchange}}', kind: '{{kind}}', bindingKeys: [{{binding_keys_js}}] },
    ],
    // Exchanges `publish` may send to (each declared by the host).
    publishes: [],
    // undefined: the host config's `max_attempts` (default 5).
    maxAttempts: undefined,
  };
}

export function handle(event) {
  // A body that is not JSON never will be: a reject dead-letters it at once,
  // with this reason. A retry is for what may pass later.
  let body;
  try {
    body = JSON.parse(new TextDecoder().decode(event.payload));
  } catch (e) {
    throw { tag: 'reject', val: `payload is not JSON: ${e.message}` };
  }
  // State is per handler and transactional per event: this write commits
  // with the ack, and only if `handle` returns normally. The bucket is the
  // handler's own, named as Spin and wasmCloud name theirs ("" works too).
  let seen;
  try {
    seen = increment(open('default'), `count.${event.routingKey}`, 1n);
  } catch (e) {
    throw { tag: 'retry', val: `state: ${e}` };
  }
  log('info', '{{name}}', `event ${seen} with routing key ${JSON.stringify(event.routingKey)}: ${JSON.stringify(body)}`);
}
