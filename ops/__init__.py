"""Operations: benchmarks (`ops.bench`) and deployment files. Imports any sdloop package;
none imports it."""
