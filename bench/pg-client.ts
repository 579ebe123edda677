// Which PostgreSQL client the server uses: `pg` (node-postgres) beside `postgres`
// (postgres.js), in one run against the private test cluster: sequential
// parameterised reads, 64 concurrent readers on a pool of 10, and a transaction
// like the server's (BEGIN, advisory lock, INSERT of a 256-byte row, COMMIT).
// Usage: npx tsx bench/pg-client.ts [--n 4000]
import pg from 'pg';
import postgres from 'postgres';
import { freshDatabase } from '../test/helpers/pg.js';

const n = Number(process.argv[process.argv.indexOf('--n') + 1] || 4000);
const url = freshDatabase('bench');

async function timed(label: string, count: number, fn: () => Promise<void>): Promise<number> {
  const t0 = performance.now();
  await fn();
  const s = (performance.now() - t0) / 1000;
  console.log(`${label.padEnd(44)} ${(count / s).toFixed(0).padStart(8)} /s`);
  return count / s;
}

async function withPg() {
  const pool = new pg.Pool({ connectionString: url, max: 10 });
  await pool.query('CREATE TABLE IF NOT EXISTS t_pg (id BIGSERIAL PRIMARY KEY, v BYTEA)');
  const row = Buffer.alloc(256, 7);
  const r = {
    seq: await timed('pg: sequential SELECT $1', n, async () => {
      for (let i = 0; i < n; i++) await pool.query('SELECT $1::int AS x', [i]);
    }),
    conc: await timed('pg: 64 concurrent SELECT $1 (pool 10)', n, async () => {
      let next = 0;
      await Promise.all(Array.from({ length: 64 }, async () => {
        while (next++ < n) await pool.query('SELECT $1::int AS x', [next]);
      }));
    }),
    tx: await timed('pg: 8 concurrent tx (lock, insert, commit)', n / 4, async () => {
      let next = 0;
      await Promise.all(Array.from({ length: 8 }, async () => {
        while (next++ < n / 4) {
          const c = await pool.connect();
          try {
            await c.query('BEGIN');
            await c.query('SELECT pg_advisory_xact_lock(1)');
            await c.query('INSERT INTO t_pg(v) VALUES ($1)', [row]);
            await c.query('COMMIT');
          } finally {
            c.release();
          }
        }
      }));
    }),
  };
  await pool.end();
  return r;
}

async function withPostgresJs() {
  const sql = postgres(url, { max: 10, onnotice: () => {} });
  await sql`CREATE TABLE IF NOT EXISTS t_pj (id BIGSERIAL PRIMARY KEY, v BYTEA)`;
  const row = Buffer.alloc(256, 7);
  const r = {
    seq: await timed('postgres.js: sequential SELECT $1', n, async () => {
      for (let i = 0; i < n; i++) await sql.unsafe('SELECT $1::int AS x', [i], { prepare: true });
    }),
    conc: await timed('postgres.js: 64 concurrent SELECT $1 (pool 10)', n, async () => {
      let next = 0;
      await Promise.all(Array.from({ length: 64 }, async () => {
        while (next++ < n) await sql.unsafe('SELECT $1::int AS x', [next], { prepare: true });
      }));
    }),
    tx: await timed('postgres.js: 8 concurrent tx (lock, insert, commit)', n / 4, async () => {
      let next = 0;
      await Promise.all(Array.from({ length: 8 }, async () => {
        while (next++ < n / 4) {
          await sql.begin(async (t) => {
            await t.unsafe('SELECT pg_advisory_xact_lock(1)');
            await t.unsafe('INSERT INTO t_pj(v) VALUES ($1)', [row]);
          });
        }
      }));
    }),
  };
  await sql.end();
  return r;
}

const a = await withPg();
const b = await withPostgresJs();
console.log(`postgres.js ÷ pg: sequential ${(b.seq / a.seq).toFixed(2)}, concurrent ${(b.conc / a.conc).toFixed(2)}, transactions ${(b.tx / a.tx).toFixed(2)}`);
