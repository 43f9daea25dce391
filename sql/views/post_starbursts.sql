-- post_starbursts: E+A galaxies in the quenching diagram (Dn4000 against HdeltaA).
-- Selection (the region of Kauffmann et al. 2003 and Wild et al. 2007 where a burst ended
-- 0.1-1 Gyr ago): HdeltaA > 4 A measured at > 3 sigma; 1.1 < Dn4000 < 1.6 (not yet old);
-- and no ongoing star formation: Halpha (or the [OII] doublet where Halpha is outside the
-- spectrum) not detected at 3 sigma. A line fitted at zero (the non-negative fit's bound)
-- counts as not detected. Star-forming galaxies have strong HdeltaA too; their lines
-- remove them here. Purity and completeness on the mock: bench/RESULTS.md (case studies).
CREATE OR REPLACE VIEW post_starbursts AS
SELECT TargetID, RA, DEC, Z, Dn4000, Dn4000_err, Hdelta_A, Hdelta_A_err,
       Halpha_Flux, OII_3729_Flux, LogMass_p50, t_quench_p50, SNR_Median
FROM ard
WHERE Hdelta_A > 4 AND Hdelta_A / Hdelta_A_err > 3
  AND Dn4000 > 1.1 AND Dn4000 < 1.6
  AND coalesce(Halpha_Flux <= 0 OR Halpha_Flux < 3 * Halpha_Flux_err,
               OII_3726_Flux + OII_3729_Flux <= 0
               OR OII_3726_Flux + OII_3729_Flux < 3 * sqrt(OII_3726_Flux_err ^ 2 + OII_3729_Flux_err ^ 2),
               false);
