// The agent's side of the memory-path tests: page contents the tests choose, and, run
// as a program, a fault server in its own process, so a test can kill it mid-fault.
//
//   node --import tsx native/test/fault-server.ts SOCKET [--mode loop|thread] [--hold PAGE]
//
// Prints "listening", then "mapping <base>" when a shim connects, "served <page>" for
// each page it answers and "holding <page>" for the file page it never answers.
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { FaultThread, PAGE_SIZE, UffdListener, type FaultMode } from '../index.js';

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/** FNV-1a 32 of `bytes`, continuing from `h`: what fault-client prints. */
export function fnv32(bytes: Uint8Array, h = FNV_OFFSET): number {
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], FNV_PRIME) >>> 0;
  return h >>> 0;
}

export const ZERO_PAGE_FNV = fnv32(new Uint8Array(PAGE_SIZE));

/** Every fourth file page is a zero page (served with UFFDIO_ZEROPAGE). */
export function isZeroPage(filePage: number): boolean {
  return filePage % 4 === 3;
}

/** The content of a file page in a generation: null for a zero page. */
export function pageContent(filePage: number, gen: number): Buffer | null {
  if (isZeroPage(filePage)) return null;
  const b = Buffer.alloc(PAGE_SIZE);
  for (let i = 0; i < PAGE_SIZE; i++) b[i] = (filePage * 7 + gen * 13 + i) & 0xff;
  b.writeUInt32LE(filePage, 0);
  b.writeUInt32LE(gen, 4);
  return b;
}

/** The fnv of a page as fault-client reads it. */
export function pageFnv(filePage: number, gen: number): number {
  return fnv32(pageContent(filePage, gen) ?? new Uint8Array(PAGE_SIZE));
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({ allowPositionals: true, options: { hold: { type: 'string' }, mode: { type: 'string', default: 'loop' } } });
  const hold = values.hold === undefined ? -1 : Number(values.hold);
  const say = (line: string) => process.stdout.write(`${line}\n`);
  const fail = (e: Error) => {
    process.stderr.write(`fault-server: ${e.message}\n`);
    process.exit(1);
  };
  await UffdListener.listen(
    positionals[0],
    (m) => {
      say(`mapping ${m.hello.base}`);
      FaultThread.start(
        m,
        {
          onFault(f, t) {
            const page = f.offset / PAGE_SIZE;
            if (page === hold) {
              say(`holding ${page}`);
              return;
            }
            t.resolve(f.pageAddress, pageContent(page, 1));
            say(`served ${page}`);
          },
          onError: fail,
        },
        { mode: values.mode as FaultMode },
      );
    },
    fail,
  );
  say('listening');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
