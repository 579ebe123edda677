// What the command line says before yargs reads it.

/** Options whose value is a 32-byte key in base64url (43 characters), which begins with '-' one time in 64. */
const KEY_OPTIONS = new Set(['--audit-key']);

/**
 * `--audit-key -Xy…` as `--audit-key=-Xy…`. Without this yargs reads a key that
 * begins with '-' as a run of one-letter options and says "unknown arguments: X, y, …".
 * No option's name is 43 base64url characters, so none is taken for a key.
 */
export function joinKeyValues(args: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const value = args[i + 1];
    if (KEY_OPTIONS.has(args[i]) && value !== undefined && /^-[A-Za-z0-9_-]{42}$/.test(value)) {
      out.push(`${args[i]}=${value}`);
      i++;
    } else {
      out.push(args[i]);
    }
  }
  return out;
}
