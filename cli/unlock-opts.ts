// Options of the commands that unseal the device keys (enroll, heartbeat, agent run).
import type { Argv } from 'yargs';
import { LetheError } from '../common/errors.js';
import { tctiFrom, secretFromChannels, type Unlock } from '../agent/index.js';

export interface UnlockArgs {
  'passphrase-fd'?: number;
  tpm?: string;
}

export const unlockOpts = <T>(y: Argv<T>) =>
  y
    .option('passphrase-fd', {
      type: 'number',
      describe: 'read the passphrase or TPM PIN from this file descriptor, to its end (else $CREDENTIALS_DIRECTORY/lethe-passphrase, else a prompt)',
    })
    .option('tpm', { type: 'string', describe: 'TPM TCTI, e.g. swtpm:port=2321 ($LETHE_TPM_TCTI; default: /dev/tpmrm0)' });

export function unlockFrom(a: UnlockArgs): Unlock {
  const fd = a['passphrase-fd'];
  if (fd !== undefined && !(Number.isInteger(fd) && fd >= 0)) {
    throw new LetheError('BAD_REQUEST', `bad --passphrase-fd '${fd}'`, { hint: 'give an open file descriptor number, e.g. --passphrase-fd 3 3<pipe' });
  }
  return { ask: secretFromChannels({ fd }), tcti: tctiFrom(a.tpm) };
}
