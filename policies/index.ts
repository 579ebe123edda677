// Policies: the YAML schema, the loader with line-numbered findings, meaning
// checks and plain-words explanations. docs/policies.md describes the keys.
export { countText, formatDiagnostic, hasErrors, type Diagnostic } from './diagnostics.js';
export { explainPolicy } from './explain.js';
export { loadPolicy, loadPolicyFile, loadPolicyOrThrow, type Loaded } from './load.js';
export { parsePolicy } from './policy.js';
export { DEFAULT_FULL_POLICY, type Policy } from './schema.js';
