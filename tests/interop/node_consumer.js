// A department system written for Node.js: a consumer calling govshare through its .proto files
// with grpc-js and proto-loader (no generated code), over mutual TLS.
//
// Usage: node node_consumer.js PROTO_DIR ADDR IDENTITY_DIR DATASET_ID
//
// Like python_consumer.py: asks who it is, files a demand for DATASET_ID and waits for its
// approval, makes a Request for id_number "js-1", prints one line per step, waits for "go" on
// stdin (the test lets the broker's idle timeout end the connection meanwhile), then makes a
// second Request on the same channel. Exit status 0 only if every step did what it should.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [protoDir, addr, identity, dataset] = process.argv.slice(2);

function fail(why) {
  console.error(why);
  process.exit(1);
}

function step(what, value) {
  process.stdout.write(`${what} ${value}\n`);
}

// Calls a unary method with a 10 s deadline, as a promise.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10000 }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

async function main() {
  const files = fs.readdirSync(path.join(protoDir, 'govshare', 'v1'))
    .filter((f) => f.endsWith('.proto'))
    .map((f) => path.join('govshare', 'v1', f));
  const defs = loader.loadSync(files, {
    includeDirs: [protoDir], keepCase: true, enums: String, defaults: true, oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(defs).govshare.v1;
  const read = (name) => fs.readFileSync(path.join(identity, name));
  const creds = grpc.credentials.createSsl(read('ca.pem'), read('node.key'), read('node.pem'));
  // The broker's development certificate names localhost; the test dials 127.0.0.1.
  const options = { 'grpc.ssl_target_name_override': 'localhost' };
  const channel = new grpc.Channel(addr, creds, options);
  const client = (Service) => new Service(addr, creds, { ...options, channelOverride: channel });
  const node = client(v1.NodeService);
  const sharing = client(v1.SharingService);
  const exchange = client(v1.ExchangeService);

  const who = await call(node, 'WhoAmI', {});
  step('whoami', who.node_id);

  let demand = (await call(sharing, 'FileDemand', {
    dataset_id: dataset, fields: ['id_number', 'status'],
    purpose: 'check pension recipients are alive',
  })).demand;
  const until = Date.now() + 20000;
  while (demand.state !== 'DEMAND_STATE_APPROVED') {
    if (Date.now() > until) fail(`the demand was not approved: ${JSON.stringify(demand)}`);
    await new Promise((r) => setTimeout(r, 50));
    demand = await call(sharing, 'GetDemand', { id: demand.id });
  }
  step('approved', demand.grant_id);

  const ask = async (idNumber) => {
    const result = await call(exchange, 'Request', {
      dataset_id: dataset,
      query: {
        filters: [{ item: 'id_number', value: { string_value: idNumber } }],
        fields: ['id_number', 'status'],
      },
    });
    if (result.state !== 'EXCHANGE_STATE_ANSWERED') fail(`not answered: ${JSON.stringify(result)}`);
    const rows = result.rows.map((row) => Object.fromEntries(
      Object.entries(row.fields).map(([k, v]) => [k, v.string_value])));
    const ok = rows.length === 1 && Object.keys(rows[0]).length === 2
      && rows[0].id_number === idNumber && rows[0].status === 'ALIVE';
    if (!ok) {
      fail(`the answer is not the provider's row about ${idNumber}: ${JSON.stringify(result)}`);
    }
    return result.state;
  };

  step('answered', await ask('js-1'));
  step('waiting', 'for the idle timeout');
  const lines = readline.createInterface({ input: process.stdin });
  const go = await new Promise((r) => lines.once('line', r));
  lines.close();
  if (go.trim() !== 'go') fail('the test did not say go');
  // The broker has told the idle connection to go away; the channel opens a new one.
  step('answered', await ask('js-2'));
  channel.close();
}

main().catch((e) => fail(e.stack || String(e)));
