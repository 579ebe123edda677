// The `lethe` command.
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { adminCommand } from './cmd-admin.js';
import { agentCommand } from './cmd-agent.js';
import { auditCommand } from './cmd-audit.js';
import { demoCommand } from './cmd-demo.js';
import { deviceCommands } from './cmd-device.js';
import { imageCommand } from './cmd-image.js';
import { policyCommand } from './cmd-policy.js';
import { serverCommand } from './cmd-server.js';
import { vmCommand } from './cmd-vm.js';
import { joinKeyValues } from './argv.js';
import { reportError } from './output.js';

// Everything Lethe writes (databases, keys, caches) is for this user only.
process.umask(0o077);

const argv = joinKeyValues(hideBin(process.argv));
const wantsJson = argv.includes('--json');

async function main(): Promise<void> {
  let cli: Argv = yargs(argv)
    .scriptName('lethe')
    .usage('$0 <command>\n\nVM streaming with server-held keys: the laptop keeps ciphertext and very little else.')
    .option('json', { type: 'boolean', describe: 'print machine-readable JSON', global: true })
    .strict()
    .recommendCommands()
    .demandCommand(1, 'name a command')
    .help()
    .version(false)
    .wrap(Math.min(100, process.stdout.columns || 100))
    .fail((msg, err) => {
      if (err) throw err;
      throw Object.assign(new Error(msg), { usage: true });
    });
  cli = demoCommand(cli);
  cli = serverCommand(cli);
  cli = adminCommand(cli);
  cli = deviceCommands(cli);
  cli = agentCommand(cli);
  cli = imageCommand(cli);
  cli = auditCommand(cli);
  cli = vmCommand(cli);
  cli = policyCommand(cli);
  await cli.parseAsync();
}

main().catch((e: unknown) => {
  if (e && typeof e === 'object' && 'usage' in e) {
    const msg = (e as unknown as Error).message;
    const suggestion = /^Did you mean (.+)\?$/.exec(msg);
    const line = suggestion ? `unknown command '${argv[0]}'` : msg.charAt(0).toLowerCase() + msg.slice(1);
    const hint = suggestion ? `did you mean '${suggestion[1]}'?` : "run 'lethe --help' for usage";
    process.stderr.write(`lethe: error: ${line}\nlethe: hint: ${hint}\n`);
    if (wantsJson) process.stdout.write(JSON.stringify({ error: { code: 'BAD_REQUEST', message: line, hint } }) + '\n');
    process.exitCode = 2;
    return;
  }
  process.exitCode = reportError(e, wantsJson);
});
