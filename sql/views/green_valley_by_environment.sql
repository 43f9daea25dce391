-- green_valley_by_environment: does the cosmic web set how fast galaxies quench?
-- Green valley: 1.45 < Dn4000 < 1.75 (between the star-forming peak near 1.2 and the
-- quiescent peak near 1.9). Split by Web_Class and by stellar mass in 0.5 dex bins (so a
-- comparison is at fixed mass), giving the count and the median and spread of the Bagpipes
-- (or amortized) quenching time t_quench_p50 (Gyr, lookback; definition in docs/physics.md).
CREATE OR REPLACE VIEW green_valley_by_environment AS
SELECT Web_Class,
       floor(LogMass_p50 * 2) / 2 AS LogMass_bin,
       count(*) AS n,
       median(t_quench_p50) AS t_quench_median,
       quantile_cont(t_quench_p50, 0.16) AS t_quench_p16,
       quantile_cont(t_quench_p50, 0.84) AS t_quench_p84,
       median(Dn4000) AS Dn4000_median
FROM ard
WHERE Dn4000 > 1.45 AND Dn4000 < 1.75
  AND Web_Class IS NOT NULL AND LogMass_p50 IS NOT NULL
GROUP BY ALL
ORDER BY LogMass_bin, Web_Class;
