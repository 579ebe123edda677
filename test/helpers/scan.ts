// Looks for a byte string where plaintext could hide: a process's memory
// (/proc/PID/mem, every readable mapping but guest RAM), a file (holes read as
// zeros), and every file under a directory.
import fs from 'node:fs';
import path from 'node:path';
import { MAGIC_MEM } from '../../guest-driver/page-format.js';

const STEP = 4 * 1024 * 1024;
const PAGE = 4096;
/** Hits kept per scan: enough to show where, not to list a whole heap. */
const MAX_HITS = 21;

/**
 * Offsets of `needle` in the readable range [start, end) of an open file that
 * `accept` (given the file offset) keeps. A short read (/proc/PID/mem stops at the
 * first page it cannot read) goes on after what was read; a failed one, a page on.
 */
function scanFd(fd: number, needle: Buffer, start: number, end: number, where: string, hits: string[], accept: (offset: number) => boolean = () => true): void {
  const buf = Buffer.alloc(STEP + needle.length);
  for (let at = start; at < end; ) {
    const len = Math.min(STEP + needle.length, end - at);
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, len, at);
    } catch {
      at += PAGE; // an unreadable page (guard pages, device mappings)
      continue;
    }
    let i = buf.subarray(0, n).indexOf(needle);
    while (i !== -1) {
      if (accept(at + i)) hits.push(`${where}+0x${(at + i - start).toString(16)}`);
      if (hits.length >= MAX_HITS) return;
      i = buf.subarray(0, n).indexOf(needle, i + 1);
    }
    if (n === 0) at += PAGE;
    else at += n < len ? n : STEP;
  }
}

/**
 * Where `needle` occurs in a process's memory, skipping mappings whose path
 * matches `skip` (guest RAM: reading it through /proc/PID/mem would fault pages
 * back in; scan its file instead).
 */
export function scanProcess(pid: number, needle: Buffer, skip?: RegExp): string[] {
  const hits: string[] = [];
  const maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8').trim().split('\n');
  const fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  try {
    for (const line of maps) {
      const [range, perms, , , , ...rest] = line.split(/\s+/);
      const name = rest.join(' ');
      if (!perms.startsWith('r') || name === '[vvar]' || name === '[vsyscall]' || (skip && skip.test(name))) continue;
      const [s, e] = range.split('-').map((x) => parseInt(x, 16));
      scanFd(fd, needle, s, e, `${pid}:${name || 'anon'}@0x${s.toString(16)}`, hits);
    }
  } finally {
    fs.closeSync(fd);
  }
  return hits;
}

/** The /proc path of a process's open fd whose target matches `re`. */
export function findFd(pid: number, re: RegExp): string | undefined {
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (re.test(fs.readlinkSync(`/proc/${pid}/fd/${fd}`))) return `/proc/${pid}/fd/${fd}`;
    } catch {
      // closed meanwhile
    }
  }
  return undefined;
}

export function scanFile(file: string, needle: Buffer): string[] {
  const hits: string[] = [];
  const fd = fs.openSync(file, 'r');
  try {
    scanFd(fd, needle, 0, fs.fstatSync(fd).size, file, hits);
  } finally {
    fs.closeSync(fd);
  }
  return hits;
}

/**
 * Hits of the marker in guest RAM (its file, read with pread, never through a
 * mapping) that are planted pages: they start with the workload's page header.
 * The workload's own copy of the marker, in its data page, is not counted.
 */
export function plantedHits(ram: string, needle: Buffer): string[] {
  const hits: string[] = [];
  const fd = fs.openSync(ram, 'r');
  try {
    const head = Buffer.alloc(4);
    const planted = (offset: number) => {
      fs.readSync(fd, head, 0, 4, offset - (offset % PAGE));
      return head.readUInt32LE(0) === MAGIC_MEM;
    };
    scanFd(fd, needle, 0, fs.fstatSync(fd).size, ram, hits, planted);
  } finally {
    fs.closeSync(fd);
  }
  return hits;
}

/** Every regular file under `dir` (recursively) that holds `needle`. */
export function scanTree(dir: string, needle: Buffer): string[] {
  const hits: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    const p = path.join(e.parentPath, e.name);
    if (!e.isFile()) continue;
    try {
      hits.push(...scanFile(p, needle));
    } catch {
      // gone meanwhile, or not readable
    }
  }
  return hits;
}
