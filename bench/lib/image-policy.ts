// Switches an image's policy between runs of a bench (lethe image policy).
import fs from 'node:fs';
import path from 'node:path';
import { lethe, type ServerProc } from '../../test/helpers/proc.js';

/** Sets `image`'s policy to the YAML `text` (written to a file in `dir`). */
export async function setImagePolicy(s: ServerProc, dir: string, image: string, text: string): Promise<void> {
  const file = path.join(dir, 'policy.yaml');
  fs.writeFileSync(file, text);
  const r = await lethe(['image', 'policy', image, file], s.env);
  if (r.code !== 0) throw new Error(`image policy failed: ${r.stderr}`);
}
