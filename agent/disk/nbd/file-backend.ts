// A BlockBackend over a plain file: pread/pwrite through fs promises, fsync on
// flush, fdatasync after a FUA write. Tests and benchmarks use it as the
// yardstick export; it keeps no cache of its own, so every connection sees the
// same page cache (what NBD_FLAG_CAN_MULTI_CONN needs).
import fs from 'node:fs/promises';
import type { BlockBackend } from './server.js';

/** Zeroes are written from this buffer in pieces of at most its size. */
const ZEROES = Buffer.alloc(1024 * 1024);

export class FileBackend implements BlockBackend {
  private constructor(
    private readonly fh: fs.FileHandle,
    readonly size: number,
    readonly readonly: boolean,
    readonly path: string,
  ) {}

  /**
   * Opens an existing file; its current length is the export size. With
   * `create`, makes (or truncates to) a sparse file of `create` bytes first.
   * Throws the file system's error with the path in its message.
   */
  static async open(path: string, opts: { readonly?: boolean; create?: number } = {}): Promise<FileBackend> {
    const ro = opts.readonly ?? false;
    try {
      if (opts.create !== undefined) {
        const fh = await fs.open(path, 'w', 0o600);
        await fh.truncate(opts.create);
        await fh.close();
      }
      const fh = await fs.open(path, ro ? 'r' : 'r+');
      const { size } = await fh.stat();
      return new FileBackend(fh, size, ro, path);
    } catch (e) {
      throw new Error(`failed to open export file ${JSON.stringify(path)}`, { cause: e });
    }
  }

  /** Throws if the file has become shorter than the export (never returns short data). */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    for (let done = 0; done < length; ) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) throw new Error(`${this.path} ends at ${offset + done}, inside a read up to ${offset + length}`);
      done += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    if (fua) await this.fh.datasync();
  }

  async flush(): Promise<void> {
    await this.fh.sync();
  }

  /**
   * Writes zeroes rather than punching a hole (no fallocate from Node): a
   * trimmed range really loses its old contents, and reads back as zeroes.
   */
  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    for (let done = 0; done < length; ) {
      const k = Math.min(ZEROES.length, length - done);
      await this.write(offset + done, ZEROES.subarray(0, k), false);
      done += k;
    }
    if (fua) await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
