// The first step of `npm run build`: clears what the last build made (dist/,
// src/generated/) and copies the contract from the repository's protos/
// into proto/ (gitignored), so the package ships the .proto it was built
// and tested with and never holds a stale copy. The client loads it at run
// time with @grpc/proto-loader; proto-loader-gen-types derives the
// TypeScript types from the same copy (the next step of the build).
'use strict';
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const source = path.resolve(root, '..', '..', 'protos', 'tokenrelay', 'v1');
const target = path.join(root, 'proto', 'tokenrelay', 'v1');

if (!fs.existsSync(source)) {
  console.error(`prepare-build: ${source} not found (build inside the tokenrelay repository)`);
  process.exit(1);
}
for (const made of ['dist', 'proto', path.join('src', 'generated')]) {
  fs.rmSync(path.join(root, made), { recursive: true, force: true });
}
fs.mkdirSync(target, { recursive: true });
for (const name of fs.readdirSync(source)) {
  if (name.endsWith('.proto')) {
    fs.copyFileSync(path.join(source, name), path.join(target, name));
  }
}
