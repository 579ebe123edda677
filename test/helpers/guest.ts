// What the test guest's workload says on its console, as the agent logs it.

export interface VerifyPass {
  pass: number;
  ok: number;
  bad: number;
}

/** The workload's verify passes (guest-driver/workload.c LETHE-VERIFY lines) in the log of an agent run with --log-guest-console. */
export function verifyPasses(log: string): VerifyPass[] {
  return [...log.matchAll(/guest: LETHE-VERIFY pass=(\d+) ok=(\d+) bad=(\d+)/g)].map((m) => ({ pass: Number(m[1]), ok: Number(m[2]), bad: Number(m[3]) }));
}
