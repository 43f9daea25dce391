-- red_misfits: the light-weighted and the mass-weighted ages disagree.
-- Dn4000 is light-weighted: a small recent burst on an old galaxy ("frosting") lowers it to
-- that of a young population, while the Bagpipes mass-weighted age stays old. Selected:
-- Dn4000 < 1.45 (what a < ~1.5 Gyr population shows) with a mass-weighted Age_p16 > 4 Gyr
-- (old at 1 sigma), or the reverse tension, Dn4000 > 1.8 with Age_p84 < 2 Gyr.
-- Both sides of a tension must hold beyond their errors: Dn4000 at 2 sigma (a noisy
-- Dn4000 at S/N ~ 1 scatters by +-0.4 and would otherwise fill the view with noise).
CREATE OR REPLACE VIEW red_misfits AS
SELECT TargetID, RA, DEC, Z, Dn4000, Dn4000_err, Age_p16, Age_p50, Age_p84, Physics_Source,
       CASE WHEN Dn4000 < 1.45 THEN 'young light, old mass' ELSE 'old light, young mass' END AS tension
FROM ard
WHERE (Dn4000 + 2 * Dn4000_err < 1.45 AND Age_p16 > 4)
   OR (Dn4000 - 2 * Dn4000_err > 1.8 AND Age_p84 < 2);
