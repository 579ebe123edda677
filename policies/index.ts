// Policies: the YAML schema, the loader with line-numbered findings, meaning
// checks and plain-words explanations. docs/policies.md describes the keys.
export { checkPolicy, type CheckContext } from './check.js';
export { countText, diagnosticError, formatDiagnostic, hasErrors, type Diagnostic } from './diagnostics.js';
export { explainPolicy } from './explain.js';
export { formatBytes, formatDuration } from './format.js';
export { fieldName, loadPolicy, loadPolicyFile, loadPolicyOrThrow, type Loaded } from './load.js';
export { DEFAULT_POLICY, classOf, parsePolicy } from './policy.js';
export {
  DEFAULT_FULL_POLICY,
  EXPIRY_ACTIONS,
  FREE_PAGE_ACTIONS,
  MEMORY_MODES,
  PREFETCH_ORDERS,
  WIPE_ACTIONS,
  type Policy,
  type ServerPolicy,
} from './schema.js';
