// `lethe server`, `server init` and `server run` as a person runs them.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { lethe, ROOT, tmpDir } from '../helpers/proc.js';

describe('lethe server (CLI)', function () {
  it('`lethe server` initializes on first use, prints url, fingerprint, admin token and audit key once, then serves', async () => {
    const dir = path.join(tmpDir(), 'data');
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(ROOT, 'cli/main.ts'), 'server', '--data', dir, '--listen', '127.0.0.1:0', '--json'], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const lines = createInterface({ input: p.stdout! })[Symbol.asyncIterator]();
    const init = JSON.parse((await lines.next()).value as string) as { url: string; fingerprint: string; adminToken: string; auditKey: string };
    expect(init.adminToken).to.match(/^lethe-admin-[A-Za-z0-9_-]{43}$/);
    // The audit key is the public half of the signing key, to pin outside the server.
    expect(init.auditKey).to.match(/^[A-Za-z0-9_-]{43}$/);
    expect(init.fingerprint).to.match(/^[0-9a-f]{64}$/);
    const ready = JSON.parse((await lines.next()).value as string) as { url: string; fingerprint: string; event: string };
    expect(ready.event).to.equal('listening');
    expect(ready.fingerprint).to.equal(init.fingerprint);

    const env = { LETHE_SERVER: ready.url, LETHE_PIN: ready.fingerprint, LETHE_ADMIN_TOKEN: init.adminToken };
    const r = await lethe(['admin', 'devices'], env);
    expect(r.stdout).to.equal('no devices enrolled\n');

    for (const f of ['master.key', 'signing.key', 'tls/key.pem', 'lethe.db', 'config.json']) {
      expect(fs.statSync(path.join(dir, f)).mode & 0o077, f).to.equal(0);
    }
    expect(fs.readFileSync(path.join(dir, 'signing.key')).subarray(32).toString('base64url')).to.equal(init.auditKey);
    // The admin token is stored only as a hash.
    const db = fs.readFileSync(path.join(dir, 'lethe.db'));
    expect(db.includes(Buffer.from(init.adminToken))).to.equal(false);

    p.kill('SIGTERM');
    const code = await new Promise((res) => p.once('exit', res));
    expect(code).to.equal(0);

    const again = await lethe(['server', 'init', '--data', dir]);
    expect(again.code).to.equal(2);
    expect(again.stderr).to.equal(
      `lethe: error: data dir '${dir}' is already initialized\nlethe: hint: run 'lethe server run --data ${dir}', or choose an empty directory\n`,
    );
  });

  it('`server run` on an address another process holds says so, with what to do', async () => {
    const dir = path.join(tmpDir(), 'data');
    expect((await lethe(['server', 'init', '--data', dir, '--listen', '127.0.0.1:0'])).code).to.equal(0);
    const holder = net.createServer();
    await new Promise<void>((r) => holder.listen(0, '127.0.0.1', () => r()));
    const port = (holder.address() as net.AddressInfo).port;
    try {
      const r = await lethe(['server', 'run', '--data', dir, '--listen', `127.0.0.1:${port}`]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.equal(
        `lethe: error: cannot listen on 127.0.0.1:${port}: the address is in use: EADDRINUSE\n` +
          'lethe: hint: another process listens there (another lethe server?): stop it, or choose another --listen\n',
      );
    } finally {
      holder.close();
    }
  });

});
