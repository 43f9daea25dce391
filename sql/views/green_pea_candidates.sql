-- green_pea_candidates: compact, extreme starbursts (Cardamone et al. 2009) by their spectra.
-- Selection: 0.1 < Z < 0.35 (the Green Pea window, where [OIII]5007 lies in the r band);
-- [OIII]5007 detected at S/N > 5; log([OIII]5007 / Hbeta) > 0.5 (extreme ionisation, far above
-- the star-forming sequence of normal galaxies); stellar mass below 10^9.5 Msun where the
-- physics layer has one (NULL mass kept: the selection must not depend on Bagpipes having run).
-- On the mock survey its purity and completeness against the injected green peas are measured
-- by bench/bench_case_studies.py and reported in bench/RESULTS.md (case studies); no unit test
-- checks the selection itself (tests/test_docs.py only checks every view is documented).
CREATE OR REPLACE VIEW green_pea_candidates AS
SELECT TargetID, RA, DEC, Z, OIII_5007_Flux, Hbeta_Flux,
       log10(OIII_5007_Flux / Hbeta_Flux) AS log_OIII_Hbeta,
       LogMass_p50, SFR_p50, SNR_Median
FROM ard
WHERE Z > 0.1 AND Z < 0.35
  AND OIII_5007_Flux / OIII_5007_Flux_err > 5
  AND Hbeta_Flux > 0
  AND log10(OIII_5007_Flux / Hbeta_Flux) > 0.5
  AND (LogMass_p50 IS NULL OR LogMass_p50 < 9.5);
