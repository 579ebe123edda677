// A policy file a command is about to use (policy explain and simulate, image
// push and image policy): refused the same way by each when it has errors.
import { LetheError } from '../common/errors.js';
import { countText, formatDiagnostic, hasErrors, loadPolicyFile, type Loaded } from '../policies/index.js';

/**
 * Loads a policy file for a command that cannot go on with a bad one. One with
 * errors is refused: every finding (warnings too) on stderr, then BAD_REQUEST
 * (exit 2) whose message ends with `refusal`, e.g. "the image keeps its policy".
 * Throws BAD_REQUEST naming the file when it cannot be read.
 */
export function loadPolicyOrRefuse(file: string, refusal: string): Loaded & { text: string } {
  const loaded = loadPolicyFile(file);
  if (!hasErrors(loaded.diagnostics)) return loaded;
  process.stderr.write(loaded.diagnostics.map((d) => formatDiagnostic(d) + '\n').join(''));
  throw new LetheError('BAD_REQUEST', `policy '${file}' has ${countText(loaded.diagnostics)}; ${refusal}`, {
    hint: `fix the errors above; 'lethe policy check ${file}' lists them again`,
  });
}
