// docs/errors.md and common/errors.ts list the same error codes, with the same
// HTTP status: a code a program may see is documented, and a documented code exists.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { ERROR_CODES } from '../../common/errors.js';
import { ROOT } from '../helpers/proc.js';

/** The code tables of docs/errors.md: code → HTTP status (0 for the client codes). */
function documentedCodes(): Map<string, number> {
  const doc = fs.readFileSync(path.join(ROOT, 'docs', 'errors.md'), 'utf8');
  const server = doc.split('## Server codes')[1].split('\n## ')[0];
  const client = doc.split('## Client codes')[1].split('\n## ')[0];
  const out = new Map<string, number>();
  for (const [section, withStatus] of [[server, true], [client, false]] as const) {
    for (const m of section.matchAll(/^\| `([A-Z_]+)` \|(?: (\d{3}) \|)?/gm)) {
      expect(out.has(m[1]), `${m[1]} is documented twice`).to.equal(false);
      out.set(m[1], withStatus ? Number(m[2]) : 0);
    }
  }
  return out;
}

describe('error codes (docs/errors.md)', () => {
  it('the documented codes are the codes in common/errors.ts, each with its status', () => {
    const documented = Object.fromEntries(documentedCodes());
    expect(documented).to.deep.equal({ ...ERROR_CODES });
  });
});
